"""Build the Dockerfile's `cpu` target with buildah and run `glmserve up` inside it.

No registry is needed: the base is Debian bookworm debootstrapped into an image built `from scratch`
(DESIGN.md §7) and passed as PYTHON_IMAGE; the build itself is `buildah bud --target cpu` on the real
Dockerfile, with chroot isolation (the host network). Where pip finds a CPU torch wheel of this venv's torch
version locally (its find-links), the build takes torch from there (TORCH_FIND_LINKS) instead of the
PyTorch index. Opt-in (the build takes minutes): GLMSERVE_TEST_IMAGE=1, as root, with buildah and debootstrap.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmserve.local_ports import free_port

REPO = Path(__file__).resolve().parents[2]
MIRROR = "http://deb.debian.org/debian"
BASE = "localhost/glmserve-test-base:bookworm"
IMAGE = "localhost/glmserve:cpu-test"
SD = ["--storage-driver", "vfs"]
OPT_IN = "GLMSERVE_TEST_IMAGE"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),  # the build alone takes 5-10 minutes on 2 cores
    pytest.mark.skipif(not (shutil.which("buildah") and shutil.which("debootstrap")),
                       reason="needs buildah and debootstrap (apt-get install buildah debootstrap)"),
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0, reason="buildah with vfs + chroot needs root"),
    pytest.mark.skipif(os.environ.get(OPT_IN) != "1",
                       reason=f"opt-in: {OPT_IN}=1 builds the CPU image (about 8 minutes, up to 6 GB of disk)"),
]


def _run(*cmd: str, timeout: float = 1800) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd[:6])}... failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout.strip()


def _base_image() -> None:
    """A minimal Debian with Python 3.11 (what python:3.11-slim-bookworm offers), kept between runs."""
    if subprocess.run(["buildah", *SD, "inspect", "--type", "image", BASE], capture_output=True).returncode == 0:
        return
    ctr = _run("buildah", *SD, "from", "scratch")
    try:
        mnt = _run("buildah", *SD, "mount", ctr)
        _run("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates,passwd",
             "bookworm", mnt, MIRROR)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(Path(mnt) / cache, ignore_errors=True)
        _run("buildah", *SD, "config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             ctr)
        _run("buildah", *SD, "commit", ctr, BASE)
    finally:
        subprocess.run(["buildah", *SD, "rm", ctr], capture_output=True)


def _torch_args(wheels: Path) -> list[str]:
    """Build args and mounts that take torch from a local CPU wheel, if pip here can find one."""
    import torch

    version = torch.__version__
    if not version.endswith("+cpu"):
        return []
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels),
                          f"torch=={version}"], capture_output=True, text=True, timeout=600)
    if got.returncode != 0 or not list(wheels.glob("torch-*.whl")):
        return []
    return ["--build-arg", f"TORCH_VERSION={version.split('+')[0]}", "--build-arg", "TORCH_FIND_LINKS=/wheels",
            "-v", f"{wheels}:/wheels:ro"]


def _ca_mount() -> list[str]:
    """Lend the build this machine's CA bundle: behind a TLS-inspecting proxy pip needs its CA. A build-time
    mount only; the image keeps Debian's bundle."""
    cafile = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    return ["-v", f"{cafile}:/etc/ssl/certs/ca-certificates.crt:ro"] if Path(cafile).is_file() else []


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(1)
    raise AssertionError(f"{url} not ready after {timeout:.0f}s")


def test_cpu_image_builds_and_serves_a_request(tmp_path):
    t0 = time.monotonic()
    _base_image()
    t_base = time.monotonic() - t0
    _run("buildah", *SD, "bud", "--isolation", "chroot", "--pull=never", "--target", "cpu",
         "--build-arg", f"PYTHON_IMAGE={BASE}", *_torch_args(tmp_path / "wheels"), *_ca_mount(),
         "-t", IMAGE, "-f", str(REPO / "Dockerfile"), str(REPO), timeout=3600)
    build_s = time.monotonic() - t0 - t_base
    size = _run("buildah", *SD, "images", "--format", "{{.Size}}", IMAGE)
    user = _run("buildah", *SD, "inspect", "--format", "{{.OCIv1.Config.User}}", IMAGE)
    assert user == "10001"

    ctr = _run("buildah", *SD, "from", "--pull=never", IMAGE)
    try:
        def inside(*cmd: str) -> subprocess.CompletedProcess:
            return subprocess.run(["buildah", *SD, "run", "--isolation", "chroot", "--user", "10001", ctr, "--", *cmd],
                                  capture_output=True, text=True, timeout=300)

        # The image's user cannot change the installed code (a read-only root changes nothing for it).
        assert inside("sh", "-c", "touch /opt/venv/probe").returncode != 0
        assert inside("glmserve", "--help").returncode == 0  # on PATH from the image's ENV

        port = free_port()
        proc = subprocess.Popen(["buildah", *SD, "run", "--isolation", "chroot", "--user", "10001", ctr, "--",
                                 "glmserve", "up", "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            import openai

            _wait_ready(f"http://127.0.0.1:{port}/ready", proc, timeout=600)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
        finally:
            os.killpg(proc.pid, 2)
            proc.wait(60)
    finally:
        subprocess.run(["buildah", *SD, "rm", ctr], capture_output=True)
        subprocess.run(["buildah", *SD, "rmi", IMAGE], capture_output=True)  # 2.6 GB; the base stays
    print(f"base image {t_base:.0f}s, cpu target built in {build_s:.0f}s, image {size}")
