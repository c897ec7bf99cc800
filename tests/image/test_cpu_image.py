"""Build the CPU variant of the glmserve image with buildah and run `glmserve up` inside it.

No registry is needed: the base is Debian bookworm debootstrapped into an image built `from scratch`
(DESIGN.md §7), then the same steps as the Dockerfile's `cpu` target run in it with chroot isolation.
Skipped where buildah/debootstrap are absent or not root: CI (.ci/run) does not install them, because the
build (debootstrap, then torch from the PyTorch CPU index) takes minutes; run it on a builder machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from glmserve.local_ports import free_port

REPO = Path(__file__).resolve().parents[2]
MIRROR = "http://deb.debian.org/debian"
SD = ["--storage-driver", "vfs"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("buildah") and shutil.which("debootstrap")),
                       reason="needs buildah and debootstrap (apt-get install buildah debootstrap)"),
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0, reason="buildah with vfs + chroot needs root"),
]


def _run(*cmd: str, timeout: float = 1800) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout.strip()


def test_cpu_image_builds_and_serves_a_request(tmp_path):
    start = time.monotonic()
    ctr = _run("buildah", *SD, "from", "scratch")
    try:
        mnt = _run("buildah", *SD, "mount", ctr)
        _run("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates,passwd",
             "bookworm", mnt, MIRROR)
        for part in ("pyproject.toml", "README.md", "Makefile", "services", "protos", "kernels", "operator"):
            _run("buildah", *SD, "copy", ctr, str(REPO / part), f"/opt/glmserve/{part}")

        def inside(*cmd: str, user: str | None = None, timeout: float = 1800) -> str:
            who = ["--user", user] if user else []
            return _run("buildah", *SD, "run", "--isolation", "chroot", *who, ctr, "--", *cmd, timeout=timeout)

        inside("python3", "-m", "venv", "/opt/venv")
        inside("/opt/venv/bin/pip", "install", "--no-cache-dir", "torch", "--index-url",
               "https://download.pytorch.org/whl/cpu")
        inside("/opt/venv/bin/pip", "install", "--no-cache-dir", "/opt/glmserve")
        inside("useradd", "--uid", "10001", "--create-home", "glmserve")
        _run("buildah", *SD, "config", "--user", "10001", "--env", "GLMSERVE_CACHE=/tmp/glmserve-cache",
             "--env", "HOME=/tmp", "--entrypoint", '["/opt/venv/bin/glmserve"]', ctr)
        image = _run("buildah", *SD, "commit", ctr, "glmserve:cpu-test")
        build_s = time.monotonic() - start
        assert image
        size = sum(f.stat().st_size for f in Path(mnt).rglob("*") if f.is_file() and not f.is_symlink())

        # Run `glmserve up` inside (chroot isolation shares the host network) as the non-root user.
        port = free_port()
        proc = subprocess.Popen(["buildah", *SD, "run", "--isolation", "chroot", "--user", "10001", ctr, "--",
                                 "/opt/venv/bin/glmserve", "up", "--port", str(port), "--dtype", "float32"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            import httpx
            import openai

            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(1)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
        finally:
            os.killpg(proc.pid, 2)
            proc.wait(60)
        print(f"image built in {build_s:.0f}s, root filesystem {size / 1e6:.0f} MB")
    finally:
        subprocess.run(["buildah", *SD, "rm", ctr], capture_output=True)
