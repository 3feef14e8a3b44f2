"""The suite's port allocator: ports the kernel will not hand to anyone else meanwhile."""

from __future__ import annotations

import contextlib
import socket

from bench.ports import free_port


def ephemeral_range() -> range:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as limits:
        first, last = map(int, limits.read().split())
    return range(first, last + 1)


def test_free_ports_are_never_handed_out_twice_even_before_anyone_binds_them():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_free_ports_lie_outside_the_range_the_kernel_picks_from_for_bind_0_and_connect():
    ephemeral = ephemeral_range()
    assert not [port for port in (free_port() for _ in range(50)) if port in ephemeral]


def test_a_free_port_binds_on_tcp_and_udp():
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", port))
        udp.bind(("127.0.0.1", port))


def test_ports_someone_holds_on_udp_only_are_skipped():
    """Gossip binds UDP too: a port with only its UDP side taken is not free."""
    last = free_port()
    with contextlib.ExitStack() as stack:
        held = set()
        for port in range(last + 1, last + 6):  # the allocator's next candidates
            udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            with contextlib.suppress(OSError):
                udp.bind(("127.0.0.1", port))
                held.add(port)
        assert held
        assert free_port() not in held
