"""Run `glmserve up` as a subprocess for end-to-end tests.

    with Deployment(model_dir, prefill=1, decode=2, extra_args=("--dtype", "float32")) as d:
        client = openai.OpenAI(base_url=d.base_url + "/v1", api_key="x")
        ...

Starts the launcher on a free port, waits until it has printed one line per process and the router's
/health answers 200, and on exit stops it with SIGINT (what Ctrl-C sends), killing the process groups if
it is not gone within 15 s. The combined stdout/stderr of all processes is kept in `.log` for failures.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Mapping, Sequence

from glmserve.local_ports import free_port

# The launcher prints `NAME pid=PID ready=URL grpc=ADDRESS` per process once all are ready.
_PROCESS_LINE = re.compile(r"^(?P<name>\S+) pid=(?P<pid>\d+) ready=(?P<ready>\S+) grpc=(?P<grpc>\S+)\s*$")
# ... and `NAME restarted (pid PID, restart N)` when its supervisor starts one again.
_RESTART_LINE = re.compile(r"^(?P<name>\S+) restarted \(pid (?P<pid>\d+)")
STOP_GRACE_S = 15.0
LOG_LINES_KEPT = 2000


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class Deployment:
    """`glmserve up --model DIR --prefill N --decode M --port P [extra_args]` for the life of a with-block.

    After start: `.port`, `.base_url` (http://host:port, no /v1), `.processes` {name: (pid, ready_url, grpc)}
    with grpc "-" for the router. After stop: `.returncode` of the launcher.
    """

    def __init__(self, model_dir: str | Path, prefill: int = 1, decode: int = 1, extra_args: Sequence[str] = (),
                 *, host: str = "127.0.0.1", ready_timeout: float = 180.0, env: Mapping[str, str] | None = None):
        self.model_dir = Path(model_dir)
        self.prefill, self.decode = prefill, decode
        self.extra_args = tuple(extra_args)
        self.host = host
        self.ready_timeout = ready_timeout
        self.env = {**os.environ, **(env or {})}
        self.port: int | None = None
        self.processes: dict[str, tuple[int, str, str]] = {}
        self.returncode: int | None = None
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._log: deque[str] = deque(maxlen=LOG_LINES_KEPT)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self._log)

    @property
    def expected_processes(self) -> int:
        return self.prefill + self.decode + 1  # and one router

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is not None:
            # pytest shows captured stderr with the failure: the workers' own account of what went wrong.
            print(f"--- last lines of `glmserve up` output ---\n{self._log_tail(200)}", file=sys.stderr)

    def start(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "glmserve.cli", "up", "--model", str(self.model_dir),
               "--prefill", str(self.prefill), "--decode", str(self.decode),
               "--host", self.host, "--port", str(self.port), *self.extra_args]
        # Own session: a Ctrl-C meant for pytest does not reach it, and its group can be killed as a whole.
        # The workers inherit the pipe, so one reader thread drains everyone's output.
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      text=True, errors="replace", env=self.env, start_new_session=True)
        self._reader = threading.Thread(target=self._read_output, name="glmserve-up-output", daemon=True)
        self._reader.start()
        self._wait_ready()

    def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._log.append(line)
            m = _PROCESS_LINE.match(line)
            if m:
                self.processes[m["name"]] = (int(m["pid"]), m["ready"], m["grpc"])
            r = _RESTART_LINE.match(line)
            if r and r["name"] in self.processes:
                _, ready, grpc = self.processes[r["name"]]
                self.processes[r["name"]] = (int(r["pid"]), ready, grpc)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        health = f"{self.base_url}/health"
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"glmserve up exited with code {self._proc.returncode} while starting:\n"
                                   + self._log_tail())
            if len(self.processes) == self.expected_processes and http_status(health) == 200:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"glmserve up not ready after {self.ready_timeout:.0f}s "
                                   f"({len(self.processes)}/{self.expected_processes} processes up):\n"
                                   + self._log_tail())
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGINT the launcher (it stops its workers); kill every process group left after STOP_GRACE_S."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._kill_group(proc.pid)
            proc.wait()
            # The launcher starts each worker in its own session, so killed it leaves them orphaned.
            workers = [pid for pid, _, _ in self.processes.values()]
            for pid in workers:
                self._kill_group(pid)
            deadline = time.monotonic() + 5
            while any(map(pid_alive, workers)) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.returncode = proc.returncode
        if self._reader is not None:
            self._reader.join(timeout=5)
        if proc.stdout is not None and not (self._reader and self._reader.is_alive()):
            proc.stdout.close()
        self._proc = None

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _log_tail(self, lines: int = 60) -> str:
        return "".join(list(self._log)[-lines:])


def pid_alive(pid: int) -> bool:
    """True while pid names a process that has not been reaped (zombies of other parents count as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
