"""The KV link server hands its listening socket to the TCPStore, which closes it when it goes. No Python
socket object may own that fd as well: its close would hit whatever socket got the same number meanwhile
(a link of another server then failed with "Bad file descriptor" now and then in the full suite)."""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path

from glmserve.engine.kv_receiver import KVLinkServer


def _listening_fd(port: int) -> int:
    """This process's fd of the TCP socket listening on `port` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return int(fd)
    raise AssertionError(f"no listening socket on port {port}")


def test_only_the_store_owns_the_listening_fd():
    server = KVLinkServer("127.0.0.1", 0)
    try:
        fd = _listening_fd(server.port)
        owners = [o for o in gc.get_objects() if type(o) is socket.socket and o.fileno() == fd]
        assert owners == [], owners
    finally:
        server.close()
