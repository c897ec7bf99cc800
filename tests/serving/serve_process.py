"""Run `glmserve serve ARGS` (router and engine in one process), or another command that answers /health on
`port`, for a with-block.

    with ServeProcess(["--model", DIR, "--port", str(port)]) as s:
        httpx.get(s.base_url + "/v1/models")

Waits until /health answers 200; on exit sends SIGINT (Ctrl-C) and kills the process group if it is not
gone within 15 s. The process's stdout/stderr is kept in `.log`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Mapping, Sequence

from tests.serving.deployment import http_status

STOP_GRACE_S = 15.0


class ServeProcess:
    def __init__(self, args: Sequence[str], port: int, *, ready_timeout: float = 180.0,
                 env: Mapping[str, str] | None = None, command: str = "serve"):
        self.command = command  # or router / prefill / decode: each answers /health on `port` once up
        self.args = list(args)
        self.port = port
        self.ready_timeout = ready_timeout
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self._log: deque[str] = deque(maxlen=2000)
        self._proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self._log)

    def __enter__(self) -> "ServeProcess":
        cmd = [sys.executable, "-m", "glmserve.cli", self.command, *self.args]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      text=True, errors="replace", env=self.env, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        try:
            while http_status(self.base_url + "/health") != 200:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"glmserve {self.command} exited with {self._proc.returncode}:\n{self.log[-4000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"glmserve {self.command} not ready after {self.ready_timeout:.0f}s:\n{self.log[-4000:]}")
                time.sleep(0.2)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._log.append(line)

    def __exit__(self, exc_type, exc, tb) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.returncode = proc.returncode
        self._proc = None
        if exc_type is not None:
            print(f"--- glmserve {self.command} output ---\n{self.log[-8000:]}", file=sys.stderr)
