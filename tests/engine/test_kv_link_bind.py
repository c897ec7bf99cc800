"""The decode worker's KV-link store listens on --host only (TCPStore alone would take every interface)."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmserve.engine.kv_receiver import KVLinkServer


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of sockets listening on port."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                out.append(address)
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_kv_link_store_binds_to_the_given_host_only():
    server = KVLinkServer("127.0.0.1", 0, timeout_s=5.0)
    try:
        assert server.port > 0
        assert _listeners(server.port) == ["0100007F"]  # 127.0.0.1, not 0.0.0.0 / ::
    finally:
        server.close()


def test_kv_port_in_use_is_a_clear_error():
    first = KVLinkServer("127.0.0.1", 0, timeout_s=5.0)
    try:
        with pytest.raises(OSError, match=f"cannot listen for the KV link on 127.0.0.1:{first.port}"):
            KVLinkServer("127.0.0.1", first.port, timeout_s=5.0)
    finally:
        first.close()
