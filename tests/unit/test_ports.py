"""``cli.ports``: the ports a local cluster and the tests use are outside the kernel's ephemeral
range, so no outgoing connection can take one before its node binds it (a CI failure: a node
whose metrics port an outgoing connection had taken failed with "Address already in use")."""

from __future__ import annotations

import socket

import pytest

from cli import ports


def test_every_port_handed_out_is_outside_the_ephemeral_range() -> None:
    low, high = ports._ephemeral()
    chosen = ports.free_ports(200)
    assert len(set(chosen)) == 200
    assert all(not low <= port <= high and port >= ports.LOWEST for port in chosen)


def test_a_port_something_listens_on_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind((ports.HOST, ports.free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_handed_out", [])  # only the bind check can see it
        monkeypatch.setattr(ports, "_candidates", lambda: [port] + list(range(20000, 20150)))
        assert port not in ports.free_ports(151)


def test_a_port_is_not_handed_out_twice_before_its_node_binds_it() -> None:
    first, second = ports.free_ports(300), ports.free_ports(300)
    assert not set(first) & set(second)


def test_an_ephemeral_range_that_covers_everything_falls_back_to_the_kernel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_ephemeral", lambda: (1024, 65535))
    chosen = ports.free_ports(5)
    assert len(set(chosen)) == 5 and all(1024 <= port <= 65535 for port in chosen)
