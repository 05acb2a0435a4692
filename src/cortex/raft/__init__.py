"""Consensus: the pysyncobj adapter (RaftNode), its durable journal and snapshots, group commit. It turns
proposals into committed log entries and hands each to the core store; it knows nothing of what they mean."""

import _socket
import socket
import sys

from cortex.raft import encryptor as _encryptor

# pysyncobj would import cryptography as it loads (encryptor.py says why not): its encryptor module is ours.
sys.modules.setdefault("pysyncobj.encryptor", _encryptor)

# pysyncobj's win_inet_pton module replaces socket.inet_ntop on every platform (only its inet_pton is
# guarded by `os.name == "nt"`) with a Windows-only function that raises on Linux. pyroute2 decodes every
# netlink address with socket.inet_ntop, so after pysyncobj loaded, the agent's address discovery, the
# netboot network checks and the floating addresses all broke. Every pysyncobj import in Cortex goes through
# this package, so loading pysyncobj here once and putting the C function back keeps the process whole.
import pysyncobj  # noqa: E402,F401

socket.inet_ntop = _socket.inet_ntop
