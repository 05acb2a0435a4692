"""Plugins that ship with Cortex and are on by default: cluster tools, skills, messaging, alerts and
Tailscale discovery. Each registers through the `cortex.plugins` entry-point group like a third-party one."""
