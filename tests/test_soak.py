"""The soak of ``bench/soak.py``, two minutes long: publish and viewer churn on a node with Redis
and a fleet peer, through a Redis restart and a peer restart. Longer runs: ``python -m bench.soak
--minutes 30`` (see docs/RELIABILITY.md, "Soak")."""

from __future__ import annotations

import pytest

from bench.soak import SoakSettings, run_soak

pytestmark = pytest.mark.timeout(300)


async def test_two_minutes_of_churn_and_restarts_leave_no_errors_gaps_or_leaks(tmp_path):
    settings = SoakSettings(duration=120.0, cycle=30.0)
    report = await run_soak(settings, tmp_path, seed=1, log=lambda line: None)
    summary = report.summary()
    assert report.problems() == [], summary
    # Each fault happened and the run exercised what it claims to (problems() checks the rest).
    assert [event.split(": ", 1)[1] for event in report.events] == [
        "redis killed", "redis started", "node B killed", "node B started"], summary
    assert len(report.samples) == 4, summary
    assert report.publishes.get("ok", 0) >= 10, summary
    assert report.churn.joined >= 50, summary  # viewers came and went
    assert report.peer.parts > 0 and report.steady.server_errors == 0, summary
    # No stream but the demo is left once the churn has stopped: ended publications are dropped.
    assert all(sample.streams_live == 1 for sample in report.samples), summary
