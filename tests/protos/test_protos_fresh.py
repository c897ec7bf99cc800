"""The committed generated modules must be exactly what `python -m glmserve.protos.generate` writes."""

from pathlib import Path

import pytest

from glmserve.protos import generate

pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the protos")


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert written, "generate() wrote nothing"
    stale = []
    for fresh in written:
        committed = generate.PROTOS_DIR / fresh.name
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(fresh.name)
    assert not stale, f"stale generated protos {stale}: run `python -m glmserve.protos.generate`"


def test_every_proto_has_its_modules() -> None:
    for proto in generate.PROTO_FILES:
        assert (generate.PROTOS_DIR / proto).is_file()
        for module in generate.generated_names(proto):
            assert (generate.PROTOS_DIR / module).is_file(), module


def test_generated_imports_use_the_package_path() -> None:
    grpc_module = (generate.PROTOS_DIR / "worker_pb2_grpc.py").read_text()
    assert "from glmserve.protos import worker_pb2" in grpc_module
    assert "\nimport worker_pb2" not in grpc_module
