"""The router process never loads torch: its whole start-up path, run for real up to the HTTP server."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from glmserve.engine.tiny_model import build_tiny_model

# Runs `glmserve router` in a fresh interpreter with the HTTP server replaced by a no-op, then reports
# which heavy modules got imported along the way (the CLI, config, tokenizer, app, worker pool, backend).
_SCRIPT = textwrap.dedent("""
    import sys
    import glmserve.router.main as router_main
    from glmserve.cli import main

    router_main.serve_http = lambda app, cfg: 0
    rc = main(["router", "--model", sys.argv[1], "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2",
               "--tool-call-parser", "glm45", "--reasoning-parser", "glm45"])
    print("rc", rc)
    print("loaded", sorted(m for m in ("torch", "transformers", "triton", "glmserve.engine.engine") if m in sys.modules))
""")


def test_router_start_up_loads_no_torch(tmp_path):
    model = build_tiny_model("glm4_moe", tmp_path / "m")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(model)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rc 0" in proc.stdout, proc.stdout + proc.stderr
    assert "loaded []" in proc.stdout, proc.stdout


def test_router_entry_imports_no_torch():
    code = "import sys, glmserve.router.main, glmserve.router.grpc_backend; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
