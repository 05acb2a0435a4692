"""Sentinel: predictive node health. Collection, a node-local history, scores, predictions, proactive alerts.

`collect.py` and `smart.py` read the machine (procfs/sysfs under an injectable root, `smartctl -j`);
`history.py` keeps the node's own time series (SQLite, downsampled); `predict.py` turns series into a score,
factors and predictions (pure, a clock passed in); `notify.py` raises and clears alerts with hysteresis and
delivers them (inbox, event bus, webhooks); `plugin.py` ties them together on every node; `records.py` is
the small summary each node publishes to the replicated state.
"""
