"""The CLI's defaults are the config dataclasses' defaults (one source), and `--help` shows them."""

from __future__ import annotations

import pytest

from glmserve import cli
from glmserve.cli_args import engine_config, router_config, worker_config
from glmserve.engine.config import CacheConfig, EngineConfig
from glmserve.router.config import RouterConfig
from glmserve.worker.config import DEFAULT_PORTS, WorkerConfig


def _parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_engine_defaults(tmp_path):
    assert engine_config(_parse("serve", "--model", "/m/tiny"), tmp_path) == EngineConfig(model="/m/tiny")


def test_router_defaults(tmp_path):
    assert router_config(_parse("router", "--model", "/m/tiny"), tmp_path) == \
        RouterConfig(model="/m/tiny", served_model_name="tiny")


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_defaults(role, tmp_path, monkeypatch):
    monkeypatch.delenv("POD_IP", raising=False)
    grpc_port, http_port = DEFAULT_PORTS[role]
    want = WorkerConfig(role=role, engine=EngineConfig(model="/m/tiny"), served_model_name="tiny",
                        grpc_port=grpc_port, http_port=http_port)
    assert worker_config(cli.build_parser().parse_args([role, "--model", "/m/tiny"]), role, tmp_path) == want


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        _parse("decode", "--help")
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"--block-size BLOCK_SIZE tokens per KV-cache block (default: {CacheConfig().block_size})" in text
    assert f"(prefill workers connect to it) (default: {WorkerConfig.kv_port})" in text
    assert f"--grpc-port GRPC_PORT gRPC port the router reaches the worker on (default: {DEFAULT_PORTS['decode'][0]})" \
        in text
    assert "--seed SEED seed of the random weights of --load-format dummy (default: 0)" in text
