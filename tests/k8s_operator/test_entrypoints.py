"""How the operator is started: run_operator (what `glmserve operator` calls) and `kopf run -m`, plus the
promises about its import graph (no torch) and the repository-root `operator/` folder (no shadowing)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from glmserve.operator.entry import run_operator
from tests.k8s_operator.kube_emulator import (CORE_RESOURCES, VersionedEmulator, client_config, declare, eventually,
                                              find, glmd)
from glmserve.local_ports import free_port
from tests.k8s_operator.samples import MINIMAL

ROOT = Path(__file__).resolve().parents[2]
NS = "team-a"


def test_operator_never_imports_torch():
    code = ("import pkgutil, sys, glmserve.operator as op\n"
            "names = [m.name for m in pkgutil.iter_modules(op.__path__)]\n"
            "for n in names: __import__('glmserve.operator.' + n)\n"
            "assert 'handlers' in names and 'entry' in names, names\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'transformers'))\n"
            "print(len(names), heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    count, heavy = out.stdout.split(" ", 1)
    assert int(count) >= 15 and heavy.strip() == "[]"


def test_repo_root_operator_folder_does_not_shadow_the_stdlib():
    assert not (ROOT / "operator" / "__init__.py").exists()
    code = "import operator, glmserve.operator.handlers; print(operator.add(2, 3), operator.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("5 ") and "site-packages" not in out.stdout.split()[1]


def test_run_operator_needs_exactly_one_scope():
    with pytest.raises(ValueError):
        run_operator(None, False)
    with pytest.raises(ValueError):
        run_operator("ns", True)


@pytest.mark.asyncio
@pytest.mark.kmock(cls=VersionedEmulator)
@pytest.mark.timeout(60)
async def test_run_operator_in_one_namespace_with_liveness(kmock):
    declare(kmock, CORE_RESOURCES)
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=run_operator, args=(NS, False), daemon=True,
                              kwargs={"liveness_port": port, "kube_config": client_config(kmock), "stop_flag": stop})
    thread.start()
    try:
        await kmock.post(f"/apis/glmserve.io/v1alpha1/namespaces/{NS}/glmdeployments", json=glmd("demo", NS, MINIMAL))
        await kmock.post("/apis/glmserve.io/v1alpha1/namespaces/elsewhere/glmdeployments",
                         json=glmd("other", "elsewhere", MINIMAL, uid="uid-other"))
        await eventually(lambda: find(kmock, "apps/v1/deployments", NS, "demo-decode"), what="children")

        def healthz() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return r.status
        assert await asyncio.to_thread(healthz) == 200
        await asyncio.sleep(0.5)
        assert find(kmock, "apps/v1/deployments", "elsewhere", "other-decode") is None  # not its namespace
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive()


@pytest.mark.asyncio
@pytest.mark.kmock(cls=VersionedEmulator)
@pytest.mark.timeout(90)
async def test_kopf_run_module_mode(kmock, tmp_path):
    """`kopf run -m glmserve.operator.handlers` with credentials from a kubeconfig, as outside a cluster."""
    declare(kmock, CORE_RESOURCES)
    kmock.objects["v1/namespaces", None, NS] = {"metadata": {"name": NS}}
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: emu\n"
        f"clusters: [{{name: emu, cluster: {{server: '{client_config(kmock).host}'}}}}]\n"
        "users: [{name: emu, user: {token: test-token}}]\n"
        "contexts: [{name: emu, context: {cluster: emu, user: emu}}]\n")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces",
                             "-m", "glmserve.operator.handlers"], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await kmock.post(f"/apis/glmserve.io/v1alpha1/namespaces/{NS}/glmdeployments", json=glmd("demo", NS, MINIMAL))
        await eventually(lambda: find(kmock, "apps/v1/deployments", NS, "demo-router"), timeout=40,
                         what="children from kopf run")
        auth = {r.headers.get("Authorization") for r in list(kmock) if r.method == "PATCH" and "/deployments/" in r.url.path}
        assert auth == {"Bearer test-token"}  # our client used the kubeconfig's credentials
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output = await asyncio.to_thread(proc.communicate, timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, output[0].decode()[-3000:]
