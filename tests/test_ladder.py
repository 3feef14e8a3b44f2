import pytest

from ingest.ladder import MIN_FALLBACK_BITRATE, RungSpec, fit_size, plan_ladder, replan_ladder

LADDER = (
    RungSpec("1080p", 1920, 1080, 5_000_000),
    RungSpec("720p", 1280, 720, 2_800_000),
    RungSpec("480p", 854, 480, 1_400_000),
    RungSpec("360p", 640, 360, 800_000, max_frame_rate=30.0),
)


def sizes(planned: list[RungSpec]) -> list[tuple[str, int, int]]:
    return [(rung.name, rung.width, rung.height) for rung in planned]


@pytest.mark.parametrize("source, expected", [
    # same aspect: rungs above the source are dropped, the others are kept as configured
    ((1920, 1080), [("1080p", 1920, 1080), ("720p", 1280, 720), ("480p", 854, 480),
                    ("360p", 640, 360)]),
    ((1280, 720), [("720p", 1280, 720), ("480p", 854, 480), ("360p", 640, 360)]),
    ((1000, 562), [("480p", 854, 480), ("360p", 640, 360)]),
    # odd source sizes with the same aspect (within 1 %) keep the configured boxes
    ((1281, 721), [("720p", 1280, 720), ("480p", 854, 480), ("360p", 640, 360)]),
    # 4:3 fits inside each 16:9 box, by height; the 1080p box gives the source size itself
    ((1440, 1080), [("1080p", 1440, 1080), ("720p", 960, 720), ("480p", 640, 480),
                    ("360p", 480, 360)]),
    ((640, 480), [("480p", 640, 480), ("360p", 480, 360)]),
    # portrait 9:16 fits each box by height; dimensions stay even
    ((720, 1280), [("1080p", 608, 1080), ("720p", 404, 720), ("480p", 270, 480),
                   ("360p", 202, 360)]),
    # ultra-wide 2.39:1 fits by width
    ((1920, 804), [("1080p", 1920, 804), ("720p", 1280, 536), ("480p", 854, 358),
                   ("360p", 640, 268)]),
])
def test_plan_ladder_drops_rungs_above_the_source_and_keeps_its_aspect(source, expected):
    assert sizes(plan_ladder(LADDER, *source)) == expected


def test_planned_rungs_keep_bitrate_and_frame_rate_cap():
    planned = {rung.name: rung for rung in plan_ladder(LADDER, 1280, 720)}
    assert planned["720p"].video_bitrate == 2_800_000
    assert planned["360p"].max_frame_rate == 30.0
    assert planned["480p"].max_frame_rate is None


def test_every_planned_size_is_even_and_within_the_source():
    for source in [(1919, 1079), (1001, 563), (333, 999), (1278, 718)]:
        for rung in plan_ladder(LADDER, *source):
            assert rung.width % 2 == 0 and rung.height % 2 == 0
            assert rung.width <= source[0] and rung.height <= source[1]


def test_rungs_fitting_to_the_same_size_are_kept_once_first_wins():
    rungs = [RungSpec("hi", 1280, 720, 3_000_000), RungSpec("wide", 1280, 1000, 2_000_000)]
    # a 16:9 source fits both boxes at 1280x720: the second would be a duplicate rendition
    assert sizes(plan_ladder(rungs, 1920, 1080)) == [("hi", 1280, 720)]


@pytest.mark.parametrize("source, expected_size, expected_bitrate", [
    # all rungs above a 320x180 source: the smallest rung, at the source size, bitrate scaled by area
    ((320, 180), (320, 180), 200_000),
    # a tiny source: the scaled bitrate would be absurd, the floor applies
    ((160, 90), (160, 90), MIN_FALLBACK_BITRATE),
    # odd source dimensions are rounded down to even
    ((321, 181), (320, 180), 200_000),
])
def test_source_below_every_rung_keeps_the_smallest_rung_at_source_size(
        source, expected_size, expected_bitrate):
    [rung] = plan_ladder(LADDER, *source)
    assert rung.name == "360p"
    assert (rung.width, rung.height) == expected_size
    assert rung.video_bitrate == expected_bitrate
    assert rung.max_frame_rate == 30.0


def test_fallback_bitrate_never_exceeds_the_configured_one():
    rungs = [RungSpec("low", 640, 360, 64_000)]
    [rung] = plan_ladder(rungs, 320, 180)
    assert rung.video_bitrate == 64_000


# -- a source that changes size mid-stream ------------------------------------------------------
ALL_LISTED = frozenset(rung.name for rung in LADDER)


def test_a_listed_rung_above_a_shrunk_source_continues_at_the_source_size():
    replanned = replan_ladder(LADDER, ALL_LISTED, 1000, 562)
    # 480p and 360p fit as before; 1080p and 720p are capped at the (even) source size
    assert sizes(replanned) == [("1080p", 1000, 562), ("720p", 1000, 562), ("480p", 854, 480),
                                ("360p", 640, 360)]
    by_name = {rung.name: rung for rung in replanned}
    assert by_name["1080p"].video_bitrate == 5_000_000  # its bitrate cap stays
    assert by_name["360p"].max_frame_rate == 30.0


def test_a_rung_capped_at_a_source_of_another_aspect_takes_the_source_aspect():
    # 4:3 640x480: the 720p box fits it at 960x720, an upscale, so 720p is the source size
    replanned = replan_ladder(LADDER, frozenset({"720p", "360p"}), 641, 481)
    assert sizes(replanned) == [("720p", 640, 480), ("480p", 640, 480), ("360p", 480, 360)]


def test_a_source_below_every_listed_rung_keeps_them_all():
    replanned = replan_ladder(LADDER, frozenset({"480p", "360p"}), 320, 180)
    # 360p is plan_ladder's fallback (scaled bitrate); 480p goes on at the source size
    assert [(r.name, r.width, r.height, r.video_bitrate) for r in replanned] == [
        ("480p", 320, 180, 1_400_000), ("360p", 320, 180, 200_000)]


def test_a_regrown_source_returns_every_rung_to_its_own_size():
    assert replan_ladder(LADDER, ALL_LISTED, 1920, 1080) == plan_ladder(LADDER, 1920, 1080)


def test_replanning_with_nothing_listed_is_plan_ladder():
    for source in [(1920, 1080), (1000, 562), (320, 180), (720, 1280)]:
        assert replan_ladder(LADDER, frozenset(), *source) == plan_ladder(LADDER, *source)


def test_a_rung_never_listed_joins_only_where_plan_ladder_plans_it():
    # only 360p was announced: 480p fits and joins; 720p and 1080p wait for a source their size
    replanned = replan_ladder(LADDER, frozenset({"360p"}), 1000, 562)
    assert sizes(replanned) == [("480p", 854, 480), ("360p", 640, 360)]


@pytest.mark.parametrize("box, source, expected", [
    ((854, 480), (1280, 720), (854, 480)),  # same aspect: the box as configured
    ((1280, 720), (1440, 1080), (960, 720)),
    ((1280, 720), (1080, 1920), (404, 720)),
    ((641, 361), (1280, 720), (640, 360)),
])
def test_fit_size(box, source, expected):
    assert fit_size(*box, *source) == expected


@pytest.mark.parametrize("rungs, width, height", [([], 1280, 720), (LADDER, 0, 720),
                                                  (LADDER, 1280, -1)])
def test_plan_ladder_rejects_nonsense(rungs, width, height):
    with pytest.raises(ValueError):
        plan_ladder(rungs, width, height)
