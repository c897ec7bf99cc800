"""gRPC settings shared by every glmserve server and client channel.

Clients reconnect quickly: gRPC's default reconnect backoff grows towards two minutes, so a worker that
was still loading its model when the router first dialled it (or that restarted) would stay out of the
pool long after it came up. Capped at one second, a worker is routable about a second after it listens.

Servers do not share ports: gRPC sets SO_REUSEPORT by default, so a second worker started on a port in
use would bind without error and the kernel would spread connections over both processes.
"""

from __future__ import annotations

import grpc

MESSAGE_LIMITS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
SERVER_OPTIONS = [*MESSAGE_LIMITS, ("grpc.so_reuseport", 0)]
CLIENT_OPTIONS = [*MESSAGE_LIMITS,
                  ("grpc.initial_reconnect_backoff_ms", 200),
                  ("grpc.min_reconnect_backoff_ms", 200),
                  ("grpc.max_reconnect_backoff_ms", 1000)]


def insecure_channel(address: str) -> grpc.aio.Channel:
    """A client channel to another glmserve service."""
    return grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
