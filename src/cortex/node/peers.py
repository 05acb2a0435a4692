"""Channels to the other nodes of the cluster."""

from __future__ import annotations

import threading

import grpc

from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex.client import channel_options, secure_channel

FORWARD_TIMEOUT = 8.0  # how long a call forwarded to another node may take


class Peers:
    """One gRPC channel per peer address, reused; channels reconnect by themselves after restarts."""

    def __init__(self, max_message_bytes: int, credentials=lambda: None):
        self._channels: dict[str, tuple[grpc.Channel, pb_grpc.ClusterStub]] = {}
        self._lock = threading.Lock()
        self._max = max_message_bytes
        self._credentials = credentials  # () -> tls.ClientFiles | None: this node's certificate

    def stub(self, address: str) -> pb_grpc.ClusterStub:
        with self._lock:
            entry = self._channels.get(address)
            if entry is None:
                files = self._credentials()
                if files is None:  # a member of a cluster created before mTLS
                    channel = grpc.insecure_channel(address, options=channel_options(self._max))
                else:
                    channel = secure_channel(address, files, channel_options(self._max))
                entry = (channel, pb_grpc.ClusterStub(channel))
                self._channels[address] = entry
            return entry[1]

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()

    def reset(self) -> None:
        """Fresh channels from now on; the old ones close once calls still using them are done."""
        with self._lock:
            old, self._channels = self._channels, {}
        timer = threading.Timer(FORWARD_TIMEOUT * 3, lambda: [c.close() for c, _ in old.values()])
        timer.daemon = True
        timer.start()
