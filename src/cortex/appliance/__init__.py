"""What the agent needs from the machine it runs on: first-boot credentials rendered into a config, the
systemd notify/watchdog protocol, and sleep/wake detection."""
