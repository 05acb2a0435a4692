"""The agent: one daemon per node. `Agent` composes the parts (Raft, store, membership, security upkeep,
plugins, gRPC services); routing sends writes to the leader and serves reads at their consistency level."""
