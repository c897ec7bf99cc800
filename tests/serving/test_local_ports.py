"""Ports for `glmserve up`: distinct, free, and outside the range the kernel hands to outgoing
connections and bind(0), so nothing else takes them before the workers bind them."""

import random
import socket

from glmserve.local_ports import _ephemeral_low, free_ports


def test_ports_are_distinct_free_and_below_the_ephemeral_range():
    ports = free_ports(12)
    assert len(set(ports)) == 12
    assert all(1024 <= p < _ephemeral_low() for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # raises if taken


def test_a_taken_port_is_never_handed_out(monkeypatch):
    import glmserve.local_ports as local_ports

    taken, spare = free_ports(2)
    draws = iter([taken, taken, spare])
    monkeypatch.setattr(local_ports, "_rng", type("Scripted", (), {"randrange": lambda self, lo, hi: next(draws)})())
    with socket.socket() as held:
        held.bind(("127.0.0.1", taken))
        held.listen()
        assert free_ports(1) == [spare]


def test_callers_seeding_random_do_not_make_two_launchers_agree():
    random.seed(0)
    first = free_ports(4)
    random.seed(0)
    assert free_ports(4) != first
