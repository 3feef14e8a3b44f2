"""A wake's answers sent while they are prepared: a helper thread makes the sends without the GIL
(``edge._sendmany``) while the event loop's thread prepares the burst's later answers, and both
send what is left at the end.

Why: answering 10,000 parked blocking reloads is 10,000 ``send`` calls, and on loopback or a fast
NIC the kernel's work per send (7-12 us on a KVM core, bench/README.md) is as much as the Python
that prepares the answer. One thread doing both answers 10,000 in no less than 100 ms. Python
threads do not help: each send releases and takes the GIL, and two threads (and the transcoders')
spend the burst handing it to each other.

For the burst the two threads are kept on different cores (the loop's thread on the one it is
on, the helper on the others; the loop's thread gets its CPU set back at the end): left to the
scheduler, both sometimes shared one core for a whole burst, and such bursts took half as long
again (bench/README.md, session 11).

A send goes straight to the socket only where nothing the transport holds can be overtaken: its
write buffer is empty and it is not closing (the caller checks, and nothing else writes to it
until the burst is finished: the loop thread is in the burst). What the kernel does not take at
once (a full socket buffer, an error) is written through the transport afterwards, which buffers
it, or meets the error and closes the connection as it would have. So a burst holds at most one
answer per connection (a woken group holds one parked request per connection): a second answer
would overtake the rest of the first.

Without the compiled module (a build without a C compiler) or without a second core there are no
bursts: every answer goes through its transport, as before.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("livedge.burst")

try:
    from edge._sendmany import Burst
except ImportError:  # built without a C compiler
    Burst = None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bursts_possible() -> bool:
    """Whether a burst's sends can overlap its preparation here."""
    return Burst is not None and usable_cores() > 1


def finish(burst: Burst) -> tuple[int, int]:
    """Make every send of ``burst``; returns how many answers it held and how many the kernel did
    not take whole at once (their rest is written through their transports)."""
    short = burst.finish()
    for transport, rest in short:
        try:
            transport.write(rest)
        except Exception:  # a transport that cannot take it: that connection alone is lost
            log.exception("a burst's answer could not be written; closing its connection")
            transport.abort()
    return burst.added, len(short)
