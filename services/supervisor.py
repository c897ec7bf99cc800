"""Restart policy of `glmserve up`: a process that exits is started again after a backoff that doubles
with each quick failure (1 s, 2 s, 4 s ... capped) and resets once it has run a while, like systemd's
Restart=always or a Kubernetes Deployment's CrashLoopBackOff."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
HEALTHY_RUN_S = 60.0  # a process that ran this long before exiting starts again at the first backoff


@dataclass
class _Track:
    started: float
    backoff: float = FIRST_BACKOFF_S
    restart_at: float | None = None
    restarts: int = 0


class Supervisor:
    """check(now) is called periodically; `respawn(proc)` starts proc again (proc.popen is replaced)."""

    def __init__(self, procs, respawn: Callable, log: Callable[[str], None], now: float = 0.0):
        self.procs = procs
        self.respawn = respawn
        self.log = log
        self.track = {p.name: _Track(started=now) for p in procs}

    def check(self, now: float) -> None:
        for p in self.procs:
            t = self.track[p.name]
            if p.popen.poll() is None:
                continue
            if t.restart_at is None:  # just noticed the exit
                if now - t.started >= HEALTHY_RUN_S:
                    t.backoff = FIRST_BACKOFF_S
                t.restart_at = now + t.backoff
                self.log(f"{p.name} exited with code {p.popen.returncode}; restarting in {t.backoff:.0f}s")
                t.backoff = min(2 * t.backoff, MAX_BACKOFF_S)
            elif now >= t.restart_at:
                self.respawn(p)
                t.restarts += 1
                t.started, t.restart_at = now, None
                self.log(f"{p.name} restarted (pid {p.popen.pid}, restart {t.restarts})")
