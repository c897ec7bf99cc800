"""Free TCP ports for the services `glmserve up` starts on this machine.

A port picked now is bound only seconds later, once the worker has imported torch. Ports from the
kernel's ephemeral range are also what every outgoing connection and every bind(0) (gloo's listeners)
gets, so in that window one of them can take it and the worker fails with EADDRINUSE. Picking below
that range leaves only other explicit picks to collide with, and those are random.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_SPAN = 12000  # how far below the ephemeral range ports are drawn from
_DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default, and the bottom of IANA's dynamic range is higher
_rng = random.SystemRandom()  # independent of any seed a caller set: two launchers must not agree


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_LOW


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_pick(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that nothing is bound to on host right now."""
    high = _ephemeral_low()
    low = max(1024, high - _SPAN)
    if high - low >= 4 * count:
        draw = lambda: _rng.randrange(low, high)  # noqa: E731
    else:  # an unusual ephemeral range leaves no room below it: let the kernel choose
        draw = lambda: _kernel_pick(host)  # noqa: E731
    chosen: list[int] = []
    for _ in range(1000 * count):
        if len(chosen) == count:
            return chosen
        port = draw()
        if port not in chosen and _bindable(host, port):
            chosen.append(port)
    if len(chosen) == count:
        return chosen
    raise RuntimeError(f"found only {len(chosen)} of {count} free ports on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
