"""A burst's sends (edge/burst.py, edge/_sendmany.c) over real TCP sockets on 127.0.0.1: every
byte arrives, in order; what the kernel does not take goes through the transport; a broken
connection is closed by its transport as a plain write would have."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge import burst as bursts


def test_the_compiled_module_is_built_and_bursts_are_possible_on_two_cores():
    # scripts/test builds the extension; a silent build failure would quietly turn bursts off.
    assert bursts.Burst is not None


class Sink(asyncio.Protocol):
    """The reading end of one connection: keeps every byte."""

    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


class Source(asyncio.Protocol):
    """The writing end: a transport, and whether the loop saw the connection end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@contextlib.asynccontextmanager
async def connected_pairs(count: int):
    """``count`` loopback TCP connections: (our ends, the far ends' sinks); closed on exit."""
    loop = asyncio.get_running_loop()
    sinks: list[Sink] = []

    def sink() -> Sink:
        sinks.append(Sink())
        return sinks[-1]

    server = await loop.create_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sources: list[Source] = []
    try:
        for _ in range(count):
            sources.append((await loop.create_connection(Source, "127.0.0.1", port))[1])
        while len(sinks) < count:
            await asyncio.sleep(0.01)
        yield sources, sinks
    finally:
        for source in sources:
            source.transport.close()
        server.close()


@pytest.fixture
def pair():
    """A connected pair of sockets (left sends, right receives), closed after the test."""
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def fd_of(source: Source) -> int:
    return source.transport.get_extra_info("socket").fileno()


async def until(condition, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_every_answer_of_a_burst_arrives_whole_and_in_order_on_its_connection():
    async with connected_pairs(300) as (sources, sinks):
        def answer(round_: int, index: int) -> bytes:
            return f"answer {round_} to {index};".encode() * (1 + index % 50)

        for round_ in range(2):  # one answer per connection and burst, as the lane sends them
            burst = bursts.Burst(len(sources))
            for index, source in enumerate(sources):
                data = answer(round_, index)
                burst.add(source.transport, fd_of(source), data[:7], data[7:-1], data[-1:])
            assert bursts.finish(burst) == (len(sources), 0)
        expected = [answer(0, index) + answer(1, index) for index in range(len(sources))]
        await until(lambda: all(len(s.data) == len(e) for s, e in zip(sinks, expected)))
        assert [bytes(s.data) for s in sinks] == expected


async def test_what_the_kernel_does_not_take_is_written_through_the_transport():
    async with connected_pairs(2) as (sources, sinks):
        partial, full = sources
        partial.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # Fill the second connection's socket: the kernel will take none of its answer.
        raw = socket.socket(fileno=os.dup(fd_of(full)))
        raw.setblocking(False)
        filler = b"f" * 65536
        filled = 0
        try:
            while True:
                filled += raw.send(filler)
        except BlockingIOError:
            pass
        finally:
            raw.close()
        big = bytes(range(256)) * 16_384  # 4 MiB: far more than the socket buffers hold
        burst = bursts.Burst(2)
        # Three pieces, the kernel stopping in one of them: the rest starts where it stopped.
        burst.add(partial.transport, fd_of(partial), big[:100], big[100:-100], big[-100:])
        burst.add(full.transport, fd_of(full), b"A" * 10, b"B", b"C")
        assert bursts.finish(burst) == (2, 2)
        assert partial.transport.get_write_buffer_size() > 0  # the rest waits in the transport
        assert 0 < full.transport.get_write_buffer_size() <= 12
        expected = [big, b"f" * filled + b"A" * 10 + b"BC"]
        await until(lambda: [len(sink.data) for sink in sinks] == [len(e) for e in expected])
        assert [bytes(sink.data) for sink in sinks] == expected


async def test_a_connection_the_peer_reset_is_closed_by_its_transport_and_others_are_answered():
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    sources, far_ends = [], []
    try:
        for _ in range(2):
            sources.append((await loop.create_connection(Source, "127.0.0.1", port))[1])
            far_ends.append(listener.accept()[0])
        reset, healthy = sources
        # The far end resets the first connection (SO_LINGER 0: close() sends RST); the loop has
        # not seen it when the burst's send meets it.
        far_ends[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        far_ends[0].close()
        burst = bursts.Burst(2)
        burst.add(reset.transport, fd_of(reset), b"to ", b"no", b"body")
        burst.add(healthy.transport, fd_of(healthy), b"still", b" ", b"here")
        assert bursts.finish(burst) == (2, 1)  # the reset one, left to its transport
        assert isinstance(await asyncio.wait_for(reset.lost, 5), OSError)  # closed with the error
        far_ends[1].settimeout(5)
        assert far_ends[1].recv(100) == b"still here"
    finally:
        for source in sources:
            source.transport.close()
        for far in far_ends:
            far.close()
        listener.close()


def test_misuse_is_refused_not_crashed(pair):
    left, right = pair
    burst = bursts.Burst(1)
    with pytest.raises(TypeError):
        burst.add(None, left.fileno(), b"", "text, not bytes", b"")
    with pytest.raises(TypeError):
        burst.add(None, left.fileno(), b"two pieces", b"")
    with pytest.raises(ValueError):
        burst.add(None, -1, b"x", b"", b"")
    burst.add(None, left.fileno(), b"o", b"n", b"e")
    with pytest.raises(OverflowError):
        burst.add(None, left.fileno(), b"t", b"w", b"o")
    assert burst.finish() == []
    with pytest.raises(RuntimeError):
        burst.add(None, left.fileno(), b"l", b"at", b"e")
    with pytest.raises(RuntimeError):
        burst.finish()
    assert right.recv(10) == b"one"
    with pytest.raises(ValueError):
        bursts.Burst(-1)


def test_a_burst_dropped_without_finishing_sends_nothing_more_and_lets_go(pair):
    # Freed later, its sockets may be closed and their numbers reused: it must not send then.
    left, right = pair
    head, middle, tail = b"nev" + bytes(1), b"er" + bytes(1), b" sent" + bytes(1)
    held = [sys.getrefcount(piece) for piece in (head, middle, tail)]
    burst = bursts.Burst(4)
    burst.add(None, left.fileno(), head, middle, tail)  # fewer than the helper is told of
    assert [sys.getrefcount(piece) for piece in (head, middle, tail)] == \
        [count + 1 for count in held]
    del burst
    right.setblocking(False)
    with pytest.raises(BlockingIOError):
        right.recv(100)
    assert [sys.getrefcount(piece) for piece in (head, middle, tail)] == held


def burst_helpers() -> set[int]:
    """This process's threads named as a burst's helper."""
    found = set()
    for name in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            if Path(f"/proc/self/task/{name}/comm").read_text().strip() == "livedge-burst":
                found.add(int(name))
    return found


def make_burst_on_a_thread() -> tuple[dict, threading.Thread]:
    """A burst made on a thread of its own that waits for ``go`` before it ends: ``burst``, that
    thread's id (``thread``) and its CPU set ``before`` and ``after`` it made the burst."""
    made: dict = {"go": threading.Event()}
    ready = threading.Event()

    def make() -> None:
        try:
            made["before"] = os.sched_getaffinity(0)
            made["burst"] = bursts.Burst(1)
            made["after"] = os.sched_getaffinity(0)
            made["thread"] = threading.get_native_id()
        finally:
            ready.set()
        made["go"].wait(10)  # alive until the test has looked at it

    maker = threading.Thread(target=make)
    maker.start()
    assert ready.wait(10) and "thread" in made, "the burst could not be made"
    return made, maker


def test_a_burst_keeps_its_helper_and_its_maker_on_different_cores_until_it_ends():
    # Left to the scheduler, both threads sometimes shared one core for a whole burst.
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        pytest.fail("bursts are for machines with two cores or more; CI has two")
    before = burst_helpers()
    made, maker = make_burst_on_a_thread()
    try:
        helpers = burst_helpers() - before
        assert len(helpers) == 1
        (maker_core,) = made["after"]  # held to the core it was on
        assert made["before"] == cores
        assert os.sched_getaffinity(helpers.pop()) == cores - {maker_core}
        # Ended from another thread (this one): the maker gets its cores back all the same.
        assert made["burst"].finish() == []
        assert os.sched_getaffinity(made["thread"]) == cores
    finally:
        made["go"].set()
        maker.join()


def test_a_burst_dropped_without_finishing_gives_its_maker_its_cores_back():
    made, maker = make_burst_on_a_thread()
    try:
        assert len(made["after"]) == 1
        del made["burst"]
        assert os.sched_getaffinity(made["thread"]) == made["before"]
    finally:
        made["go"].set()
        maker.join()


def test_a_burst_made_on_a_thread_restricted_to_one_core_changes_nothing(pair):
    left, right = pair
    core = min(os.sched_getaffinity(0))
    made: dict = {}

    def make_and_finish() -> None:
        os.sched_setaffinity(0, {core})
        burst = bursts.Burst(1)
        made["during"] = os.sched_getaffinity(0)
        burst.add(None, left.fileno(), b"on ", b"one ", b"core")
        made["short"] = burst.finish()

    worker = threading.Thread(target=make_and_finish)
    worker.start()
    worker.join()
    assert made == {"during": {core}, "short": []}
    assert right.recv(100) == b"on one core"


def test_a_file_descriptor_that_runs_code_cannot_overfill_a_burst(pair):
    left, right = pair
    burst = bursts.Burst(1)

    class Sneaky:  # its conversion to an int adds to the same burst first
        def __index__(self) -> int:
            burst.add(None, left.fileno(), b"in", b"ne", b"r")
            return left.fileno()

    with pytest.raises(OverflowError):
        burst.add(None, Sneaky(), b"ou", b"te", b"r")
    assert burst.added == 1 and burst.finish() == []
    assert right.recv(10) == b"inner"


# A stand-in for a kernel that takes fewer bytes: sendmsg through to the real one, its iovecs cut
# to the limit set for the fd (-1: EAGAIN), so that every split point can be reached on purpose.
SHORT_SENDMSG = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>
#include <sys/uio.h>
static long limit[1024];
static char limited[1024];
void take_at_most(int fd, long bytes) { limit[fd] = bytes; limited[fd] = 1; }
ssize_t sendmsg(int fd, const struct msghdr *message, int flags) {
    static ssize_t (*real)(int, const struct msghdr *, int);
    if (!real) real = dlsym(RTLD_NEXT, "sendmsg");
    if (fd < 0 || fd >= 1024 || !limited[fd]) return real(fd, message, flags);
    long left = limit[fd];
    if (left < 0) { errno = EAGAIN; return -1; }
    struct iovec pieces[8];
    struct msghdr cut = *message;
    size_t count = 0;
    for (size_t i = 0; i < message->msg_iovlen && left > 0 && count < 8; i++) {
        pieces[count] = message->msg_iov[i];
        if ((long)pieces[count].iov_len > left) pieces[count].iov_len = (size_t)left;
        left -= (long)pieces[count++].iov_len;
    }
    if (count == 0) return 0;
    cut.msg_iov = pieces;
    cut.msg_iovlen = count;
    return real(fd, &cut, flags);
}
"""

EVERY_SPLIT = r"""
import ctypes, socket, sys
from edge import burst as bursts
shim = ctypes.CDLL(None)
shapes = [(b"", b"", b""), (b"H", b"", b""), (b"", b"", b"T"), (b"HEAD", b"", b"TAIL"),
          (b"", b"MID", b""), (b"HH", b"MMM", b"TTTT"), (b"head:", b"id-1", b":tail")]
cases = [(shape, taken) for shape in shapes for taken in range(-1, sum(map(len, shape)) + 1)]
wrong = []
for head, middle, tail in shapes:
    pairs, whole = [], head + middle + tail
    takes = list(range(-1, len(whole) + 1))
    burst = bursts.Burst(len(takes))
    for taken in takes:
        left, right = socket.socketpair()
        pairs.append((left, right))
        shim.take_at_most(left.fileno(), taken)
        burst.add(taken, left.fileno(), head, middle, tail)  # the "transport" names the case
    rests = dict(burst.finish())
    for taken, (left, right) in zip(takes, pairs):
        right.setblocking(False)
        try:
            received = right.recv(100)
        except BlockingIOError:
            received = b""
        sent = max(taken, 0)
        if received != whole[:sent] or rests.get(taken, b"") != whole[sent:] \
                or (taken in rests) != (sent < len(whole)):
            wrong.append((head, middle, tail, taken, received, rests.get(taken)))
        shim.take_at_most(left.fileno(), 1 << 30)  # the number may come back as another socket's
        left.close()
        right.close()
print(len(cases), "cases;", "wrong:", wrong)
sys.exit(1 if wrong else 0)
"""


def test_the_rest_of_a_partial_send_starts_where_the_kernel_stopped_in_any_piece(tmp_path):
    source = tmp_path / "short_sendmsg.c"
    source.write_text(SHORT_SENDMSG)
    shim = tmp_path / "short_sendmsg.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"],
                   check=True)
    result = subprocess.run([sys.executable, "-c", EVERY_SPLIT], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=60,
                            env={**os.environ, "LD_PRELOAD": str(shim)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrong: []" in result.stdout
