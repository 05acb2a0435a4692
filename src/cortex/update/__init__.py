"""Updates of the appliance: signed release payloads (publish, serve, verify), rolling updates as a
replicated state machine, the updater plugin that drives them and the node OS that installs a release."""
