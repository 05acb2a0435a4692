"""The replicated state machine's core: the command envelope, argument rules, the domain registry and the
SQLite store that applies each committed log entry in one transaction. Pure and deterministic: no sockets,
no clocks beyond what a command carries; the Raft layer feeds it and the node layer reads it."""
