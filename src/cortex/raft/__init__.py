"""Consensus: the pysyncobj adapter (RaftNode), its durable journal and snapshots, group commit. It turns
proposals into committed log entries and hands each to the core store; it knows nothing of what they mean."""
