"""Shared memory: replicated threads, thoughts and context for an AI assistant working across machines.

- schema.py: the tables (replicated and node-local), their migrations and the limits;
- sqlguard.py: SQLite authorizers for caller-supplied SQL (read-only queries, deterministic writes);
- domain.py: the state domain applied by every replica, from validators.py, handlers.py and queries.py
  (commands checked, applied, read) and content.py (columns, restore chunks, the content digest);
- localstore.py: the node-local store for `local`-tier rows, which never leave the node;
- plugin.py: the `memory` plugin: the 12 tools, whereami.md and the leader's backup schedule;
- whereami.py, backup.py, cli.py: the snapshot renderer, backups (directory or S3) and `cortex backup`.
"""
