"""A decode worker with MTP and a prefill worker started without it (processes started by hand, as
`glmserve up` never does): the client gets a clear error naming the flag, at once, not a hang or a 5xx
without a reason; the blocks the decode worker held for the request are freed."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest

from glmserve.engine.tiny_model import build_tiny_model
from glmserve.local_ports import free_port
from tests.serving.deployment import http_status


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glmserve.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    model = str(build_tiny_model("glm4_moe_lite", tmp_path_factory.mktemp("mismatch") / "model", seed=2))
    common = ("--model", model, "--host", "127.0.0.1", "--dtype", "float32", "--num-kv-blocks", "32", "--no-progress",
              "--torch-threads", "1")
    p_grpc, p_http, d_grpc, d_http, port = (free_port() for _ in range(5))
    procs = [_start("prefill", *common, "--grpc-port", str(p_grpc), "--http-port", str(p_http)),
             _start("decode", *common, "--grpc-port", str(d_grpc), "--http-port", str(d_http), "--kv-port", "0",
                    "--speculative-algorithm", "mtp", "--speculative-num-steps", "2")]
    try:
        deadline = time.monotonic() + 180
        while not all(http_status(f"http://127.0.0.1:{p}/ready") == 200 for p in (p_http, d_http)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
            time.sleep(0.3)
        procs.append(_start("router", "--model", model, "--host", "127.0.0.1", "--port", str(port),
                            "--prefill", f"127.0.0.1:{p_grpc}", "--decode", f"127.0.0.1:{d_grpc}"))
        while http_status(f"http://127.0.0.1:{port}/health") != 200:
            assert time.monotonic() < deadline and procs[-1].poll() is None, "router did not start"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{d_http}"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def test_client_gets_an_error_naming_the_flag(split):
    base, decode = split
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=4, temperature=0)
    assert time.monotonic() - started < 20  # refused, not retried until the router gives up
    assert err.value.status_code == 500
    assert "--speculative-algorithm mtp" in err.value.message
    deadline = time.monotonic() + 10  # the abort reaches the engine thread just after the error goes out
    while httpx.get(decode + "/load", timeout=10).json()["kv_cache_usage_perc"] != 0:
        assert time.monotonic() < deadline, "the decode worker still holds the request's blocks"
        time.sleep(0.1)
