"""Regenerate the Python gRPC modules from the .proto files: `python -m glmserve.protos.generate`.

The protos are compiled from a scratch tree where they sit under `glmserve/protos/`, so protoc itself
writes `from glmserve.protos import worker_pb2` in the generated modules (no import rewriting), and
the descriptors are registered under a path no other package uses.
protoc runs in a subprocess whose working directory is that scratch tree: started from the repository
root, the root's `operator/` folder would shadow Python's standard `operator` module.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
PACKAGE_PATH = Path("glmserve") / "protos"
PROTO_FILES = ("worker.proto",)


def generated_names(proto_file: str) -> list[str]:
    """The modules protoc writes for one .proto file."""
    stem = Path(proto_file).stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def _well_known_include() -> Path:
    import grpc_tools  # dev dependency (grpcio-tools); only needed to regenerate

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def generate(out_dir: Path = PROTOS_DIR) -> list[Path]:
    """Compile every proto in PROTO_FILES and write the generated modules into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="glmserve-protoc-") as tmp:
        src_root, gen_root = Path(tmp) / "src", Path(tmp) / "gen"
        (src_root / PACKAGE_PATH).mkdir(parents=True)
        gen_root.mkdir()
        for name in PROTO_FILES:
            shutil.copyfile(PROTOS_DIR / name, src_root / PACKAGE_PATH / name)
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{src_root}", f"-I{_well_known_include()}",
            f"--python_out={gen_root}", f"--pyi_out={gen_root}", f"--grpc_python_out={gen_root}",
            *[str(PACKAGE_PATH / name) for name in PROTO_FILES],
        ]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"protoc failed ({proc.returncode}):\n{proc.stderr}")
        for name in PROTO_FILES:
            for module in generated_names(name):
                target = out_dir / module
                shutil.copyfile(gen_root / PACKAGE_PATH / module, target)
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTOS_DIR, help="where to write (default: protos/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
