"""A worker started on a gRPC port that is in use fails at once with a clear message, instead of
silently sharing the port with the process already there (gRPC's default SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import grpc
import pytest

from glmserve.local_ports import free_port
from glmserve.worker.grpc_options import SERVER_OPTIONS


def test_two_servers_cannot_share_a_port():
    async def run():
        port = free_port()
        first = grpc.aio.server(options=SERVER_OPTIONS)
        first.add_insecure_port(f"127.0.0.1:{port}")
        await first.start()
        try:
            second = grpc.aio.server(options=SERVER_OPTIONS)
            with pytest.raises(RuntimeError):
                second.add_insecure_port(f"127.0.0.1:{port}")
        finally:
            await first.stop(None)

    asyncio.run(run())


def test_worker_on_a_taken_grpc_port_exits_with_a_clear_error(tmp_path):
    port = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "glmserve.cli", "prefill", "--model", str(tmp_path / "never-loaded"),
             "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", str(free_port())],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in proc.stderr
