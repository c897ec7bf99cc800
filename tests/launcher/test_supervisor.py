"""`glmserve up`'s restart policy on fake processes: exits are restarted after a doubling backoff, which
resets once a process has run a while; running processes are left alone."""

from __future__ import annotations

from dataclasses import dataclass

from glmserve.supervisor import HEALTHY_RUN_S, MAX_BACKOFF_S, Supervisor


class _Popen:
    pids = iter(range(100, 10_000))

    def __init__(self, code=None):
        self.returncode = code
        self.pid = next(self.pids)

    def poll(self):
        return self.returncode


@dataclass
class _Proc:
    name: str
    popen: _Popen


def _run(times, crash_after_restart=True):
    procs = [_Proc("decode-0", _Popen()), _Proc("router", _Popen())]
    restarts, lines = [], []

    def respawn(p):
        restarts.append(now[0])
        p.popen = _Popen()

    sup = Supervisor(procs, respawn, lines.append, now=0.0)
    now = [0.0]
    procs[0].popen.returncode = -9  # SIGKILL
    for t in times:
        now[0] = t
        sup.check(t)
        if crash_after_restart and procs[0].popen.returncode is None and restarts and restarts[-1] == t:
            procs[0].popen.returncode = 1  # crashes again at once
    return restarts, lines, procs


def test_a_dead_process_is_restarted_with_a_doubling_backoff():
    restarts, lines, procs = _run([x * 0.5 for x in range(0, 200)])
    assert restarts[:4] == [1.0, 3.5, 8.0, 16.5]  # noticed at 0/1.5/4/8.5, then 1, 2, 4, 8 s later
    gaps = [b - a for a, b in zip(restarts, restarts[1:])]
    assert all(g <= MAX_BACKOFF_S + 1 for g in gaps)
    assert "decode-0 exited with code -9; restarting in 1s" in lines[0]
    assert procs[1].popen.pid and not any("router" in line for line in lines)  # the healthy one untouched


def test_backoff_resets_after_a_long_healthy_run():
    procs = [_Proc("prefill-0", _Popen(code=1))]
    restarts = []
    sup = Supervisor(procs, lambda p: (restarts.append(t), setattr(p, "popen", _Popen())), lambda _: None, now=0.0)
    for t in (0.0, 1.0):
        sup.check(t)
    procs[0].popen.returncode = 1
    for t in (1.5, 2.5, 3.5):  # quick failure: 2 s backoff
        sup.check(t)
    assert restarts == [1.0, 3.5]
    t0 = 3.5 + HEALTHY_RUN_S + 1
    procs[0].popen.returncode = 1  # dies after a long healthy run: back to 1 s
    for t in (t0, t0 + 1.0):
        sup.check(t)
    assert restarts[-1] == t0 + 1.0
