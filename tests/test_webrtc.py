"""WebRTC ingest without HTTP: offers checked, answers made, frames from a real aiortc publisher (in
this process, over 127.0.0.1) delivered to a recording sink by one feeder thread.

The publisher helpers here (moving test tracks, ``open_client``) are reused by tests/test_whip.py.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import threading
import time

import av
import numpy as np
import pytest
from aiortc import (RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ingest.webrtc import (ACCEPTED_CODECS, FrameFeeder, OfferRejected, PublisherState,
                           WebRtcPublisher, WebRtcSettings, advertise_candidates, answer_candidates,
                           estimate_frame_rate, gathering_on, inspect_offer, negotiated_codecs,
                           plan_hosts)

pytestmark = pytest.mark.timeout(60)

LOOPBACK = WebRtcSettings(hosts=("127.0.0.1",))
WIDTH, HEIGHT, FPS = 320, 180, 30
AUDIO_RATE, AUDIO_PTIME = 48_000, 0.020

# What FFmpeg 8.1's whip muxer (PyAV 18.1) POSTs for libx264 baseline + libopus: no candidates,
# a=setup:passive, H.264 with RTX.
FFMPEG_OFFER = "\r\n".join([
    "v=0", "o=FFmpeg 4489045141692799359 2 IN IP4 127.0.0.1", "s=FFmpegPublishSession", "t=0 0",
    "a=group:BUNDLE 0 1", "a=extmap-allow-mixed", "a=msid-semantic: WMS",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111", "c=IN IP4 0.0.0.0", "a=ice-ufrag:73df80fb",
    "a=ice-pwd:98a0339cfa06e5059d8221fd976644b6",
    "a=fingerprint:sha-256 43:A2:04:C2:16:A9:DC:1E:E0:07:F1:47:40:1A:6C:63:0F:C0:FB:8D:BC:8B:3D:01"
    ":C6:38:6D:3B:E1:CC:F1:97",
    "a=setup:passive", "a=mid:0", "a=sendonly", "a=msid:FFmpeg audio", "a=rtcp-mux",
    "a=rtpmap:111 opus/48000/2", "a=ssrc:3551381803 cname:FFmpeg",
    "a=ssrc:3551381803 msid:FFmpeg audio",
    "m=video 9 UDP/TLS/RTP/SAVPF 106 105", "c=IN IP4 0.0.0.0", "a=ice-ufrag:73df80fb",
    "a=ice-pwd:98a0339cfa06e5059d8221fd976644b6",
    "a=fingerprint:sha-256 43:A2:04:C2:16:A9:DC:1E:E0:07:F1:47:40:1A:6C:63:0F:C0:FB:8D:BC:8B:3D:01"
    ":C6:38:6D:3B:E1:CC:F1:97",
    "a=setup:passive", "a=mid:1", "a=sendonly", "a=msid:FFmpeg video", "a=rtcp-mux",
    "a=rtcp-rsize", "a=rtpmap:106 H264/90000",
    "a=fmtp:106 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42000d",
    "a=rtcp-fb:106 nack", "a=rtpmap:105 rtx/90000", "a=fmtp:105 apt=106",
    "a=ssrc-group:FID 3551381804 3551381805", "a=ssrc:3551381804 cname:FFmpeg",
    "a=ssrc:3551381804 msid:FFmpeg video", ""])


# -- publisher side helpers (also used by test_whip.py) ---------------------------------------------------

class MovingVideo(MediaStreamTrack):
    """320x180 frames at 30 fps, paced in real time: a luma ramp that scrolls and a bright bar that
    sweeps across, so consecutive frames differ everywhere."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._index = 0
        self._start: float | None = None
        columns = np.arange(WIDTH, dtype=np.int32)
        self._ramp = np.tile(columns, (HEIGHT, 1))

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._index / FPS
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        luma = ((self._ramp + 4 * self._index) % 220 + 16).astype(np.uint8)
        bar = (8 * self._index) % WIDTH
        luma[:, bar:bar + 16] = 235
        chroma = np.full((HEIGHT // 2, WIDTH), 128, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(np.vstack([luma, chroma]), format="yuv420p")
        frame.pts = self._index * 90_000 // FPS
        frame.time_base = fractions.Fraction(1, 90_000)
        self._index += 1
        return frame


class ToneAudio(MediaStreamTrack):
    """A 440 Hz stereo tone in 20 ms s16 frames at 48 kHz, paced in real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._sent = 0  # samples
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._sent / AUDIO_RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        count = int(AUDIO_RATE * AUDIO_PTIME)
        phase = 2 * math.pi * 440 * (self._sent + np.arange(count)) / AUDIO_RATE
        samples = (8000 * np.sin(phase)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(samples, 2).reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._sent
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._sent += count
        return frame


async def open_client(video_codec: str | None = "H264", audio: bool = True) -> RTCPeerConnection:
    """An aiortc publisher with its offer made (candidates on 127.0.0.1 only): a moving picture in
    ``video_codec`` ("H264" or "VP8"; None for none) and, with ``audio``, an Opus tone."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if video_codec:
        transceiver = pc.addTransceiver(MovingVideo(), direction="sendonly")
        transceiver.setCodecPreferences([
            codec for codec in RTCRtpSender.getCapabilities("video").codecs
            if codec.name in (video_codec, "rtx")])
    if audio:
        pc.addTransceiver(ToneAudio(), direction="sendonly")
    with gathering_on(["127.0.0.1"]):
        await pc.setLocalDescription(await pc.createOffer())
    return pc


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class RecordingSink:
    """A FrameSink that remembers what it was given, in order, and by which thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float | None]] = []  # ("hint"|"video"|"audio", value)
        self.video_sizes: set[tuple[int, int]] = set()
        self.video_times: list[float] = []
        self.audio_times: list[float] = []
        self.lumas: list[np.ndarray] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def hint_frame_rate(self, frames_per_second: float | None) -> None:
        self._record("hint", frames_per_second)

    def push_video(self, frame: av.VideoFrame) -> None:
        luma = frame.to_ndarray(format="gray")
        with self.lock:
            self.video_sizes.add((frame.width, frame.height))
            self.video_times.append(float(frame.time))
            if len(self.lumas) < 2 or len(self.video_times) % 15 == 0:
                self.lumas.append(luma)
        self._record("video", float(frame.time))

    def push_audio(self, frame: av.AudioFrame) -> None:
        with self.lock:
            self.audio_times.append(float(frame.time))
        self._record("audio", float(frame.time))

    def _record(self, kind: str, value: float | None) -> None:
        with self.lock:
            self.events.append((kind, value))
            self.threads.add(threading.current_thread().name)

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(event == kind for event, _ in self.events)


# -- offers -----------------------------------------------------------------------------------------------

def _offer(*sections: str) -> str:
    head = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0"]
    return "\r\n".join(head + list(sections)) + "\r\n"


def _section(kind: str, payloads: list[tuple[int, str, str | None]], direction: str = "sendonly",
             *, ice: bool = True, fingerprint: bool = True, rtcp_mux: bool = True,
             mid: str | None = None) -> str:
    lines = [f"m={kind} 9 UDP/TLS/RTP/SAVPF {' '.join(str(pt) for pt, _, _ in payloads)}",
             "c=IN IP4 0.0.0.0"]
    if ice:
        lines += ["a=ice-ufrag:abcd", "a=ice-pwd:abcdefghijklmnopqrstuvwx"]
    if fingerprint:
        lines.append("a=fingerprint:sha-256 " + ":".join(["AB"] * 32))
    lines += ["a=setup:actpass", f"a=mid:{mid or kind}", f"a={direction}"]
    if rtcp_mux:
        lines.append("a=rtcp-mux")
    for pt, rtpmap, fmtp in payloads:
        lines.append(f"a=rtpmap:{pt} {rtpmap}")
        if fmtp:
            lines.append(f"a=fmtp:{pt} {fmtp}")
    return "\r\n".join(lines)


OPUS = (111, "opus/48000/2", "minptime=10;useinbandfec=1")
VP8 = (96, "VP8/90000", None)
H264_CB = (102, "H264/90000", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f")
H264_HIGH = (104, "H264/90000", "packetization-mode=1;profile-level-id=640032")
H264_MODE0 = (106, "H264/90000", "profile-level-id=42e01f")
VP9 = (98, "VP9/90000", "profile-id=0")
AV1 = (45, "AV1/90000", None)
RTX = (97, "rtx/90000", "apt=96")
PCMU = (0, "PCMU/8000", None)


def test_ffmpeg_whip_offer_is_accepted_and_names_its_passive_dtls_role():
    summary = inspect_offer(FFMPEG_OFFER)
    assert summary.kinds == ("audio", "video")
    assert summary.codecs == (("opus",), ("H264",))
    assert summary.setup == "passive"
    assert summary.candidates == 0


def test_a_browser_like_offer_keeps_every_acceptable_codec():
    summary = inspect_offer(_offer(_section("audio", [OPUS, PCMU]),
                                   _section("video", [VP8, RTX, VP9, H264_HIGH, H264_CB, AV1])))
    assert summary.codecs == (("opus",), ("VP8", "H264"))
    assert summary.setup == "actpass"


@pytest.mark.parametrize("offer, message", [
    ("hello", "not an SDP offer"),
    ("", "not an SDP offer"),
    ("v=0\r\nm=video\r\n", "cannot be parsed"),
    (_offer(), "no audio or video section"),
    (_offer("m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0"),
     "no audio or video section"),
    (_offer(_section("video", [VP9, AV1])), "the video section offers VP9, AV1; this server "
                                            "accepts " + ACCEPTED_CODECS),
    (_offer(_section("audio", [PCMU])), "the audio section offers PCMU"),
    (_offer(_section("video", [H264_HIGH])), "offers H264"),  # High profile: not receivable
    (_offer(_section("video", [H264_MODE0])), "offers H264"),  # packetization-mode 0
    (_offer(_section("video", [VP8], "recvonly")), "does not send media (a=recvonly)"),
    (_offer(_section("video", [VP8], "inactive")), "does not send media (a=inactive)"),
    (_offer(_section("video", [VP8], ice=False)), "no ICE credentials"),
    (_offer(_section("video", [VP8], fingerprint=False)), "no DTLS fingerprint"),
    (_offer(_section("video", [VP8], rtcp_mux=False)), "rtcp-mux"),
    (_offer(_section("video", [VP8], mid="0"), _section("video", [VP8], mid="1")),
     "2 video sections"),
])
def test_offers_we_cannot_receive_are_rejected_with_a_reason(offer, message):
    with pytest.raises(OfferRejected) as raised:
        inspect_offer(offer)
    assert message in str(raised.value)


def test_rejection_messages_do_not_echo_junk_codec_names():
    offer = _offer(_section("video", [(96, "X<script>/90000", None)]))
    with pytest.raises(OfferRejected) as raised:
        inspect_offer(offer)
    assert "<" not in str(raised.value) and "Xscript" in str(raised.value)


# -- candidates -------------------------------------------------------------------------------------------

ANSWER = "\r\n".join([
    "v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "a=group:BUNDLE 0",
    "m=video 40000 UDP/TLS/RTP/SAVPF 96", "c=IN IP4 10.0.0.5", "a=mid:0",
    "a=candidate:aaaa 1 udp 2130706431 10.0.0.5 40000 typ host",
    "a=candidate:bbbb 1 udp 2130706175 fd00::5 40001 typ host",
    "a=candidate:cccc 1 udp 1694498815 198.51.100.9 40000 typ srflx raddr 10.0.0.5 rport 40000",
    "a=end-of-candidates", "a=setup:active", ""])


@pytest.mark.parametrize("external, keep, expected", [
    ((), True, [("10.0.0.5", 40000, "host"), ("fd00::5", 40001, "host"),
                ("198.51.100.9", 40000, "srflx")]),
    (("203.0.113.7",), False, [("203.0.113.7", 40000, "host"), ("198.51.100.9", 40000, "srflx")]),
    (("203.0.113.7",), True, [("10.0.0.5", 40000, "host"), ("203.0.113.7", 40000, "host"),
                              ("fd00::5", 40001, "host"), ("198.51.100.9", 40000, "srflx")]),
    (("203.0.113.7", "2001:db8::7"), False, [("203.0.113.7", 40000, "host"),
                                             ("2001:db8::7", 40001, "host"),
                                             ("198.51.100.9", 40000, "srflx")]),
])
def test_external_addresses_are_advertised_with_the_gathered_ports(external, keep, expected):
    rewritten = advertise_candidates(ANSWER, external, keep)
    assert answer_candidates(rewritten) == expected
    first = expected[0]
    assert f"c=IN IP4 {first[0]}" in rewritten and f"m=video {first[1]} " in rewritten
    assert rewritten.endswith("a=setup:active\r\n")
    foundations = [line.split()[0] for line in rewritten.splitlines()
                   if line.startswith("a=candidate:")]
    assert len(set(foundations)) == len(foundations)


async def test_hosts_split_into_local_and_external_addresses():
    assert (await plan_hosts(())).gather is None
    plan = await plan_hosts(("127.0.0.1", "203.0.113.7", "127.0.0.1"))
    assert plan.gather == ("127.0.0.1",) and plan.external == ("203.0.113.7",)
    assert plan.keep_gathered
    plan = await plan_hosts(("203.0.113.7",))
    assert plan.gather is None and plan.external == ("203.0.113.7",) and not plan.keep_gathered
    plan = await plan_hosts(("localhost",))
    assert "127.0.0.1" in plan.gather


async def test_answer_to_ffmpeg_offer_is_the_dtls_client_on_loopback_only():
    publisher = WebRtcPublisher(RecordingSink(), LOOPBACK, label="ffmpeg-offer")
    answer = await publisher.answer(FFMPEG_OFFER)
    try:
        # FFmpeg is the DTLS server (a=setup:passive): we must be the client.
        assert answer.count("a=setup:active") == 2 and "a=setup:passive" not in answer
        candidates = answer_candidates(answer)
        assert candidates and {address for address, _, _ in candidates} == {"127.0.0.1"}
        # FFmpeg reads the first "udp ... typ host" candidate line and nothing else.
        assert candidates[0][2] == "host"
        assert negotiated_codecs(answer) == {"audio": "opus", "video": "H264"}
        assert "a=end-of-candidates" in answer
        assert publisher.state is PublisherState.CONNECTING
    finally:
        await publisher.close("test over")
    assert publisher.state is PublisherState.CLOSED


async def test_an_external_address_is_advertised_next_to_loopback():
    settings = WebRtcSettings(hosts=("127.0.0.1", "203.0.113.7"))
    publisher = WebRtcPublisher(RecordingSink(), settings)
    try:
        answer = await publisher.answer(FFMPEG_OFFER)
    finally:
        await publisher.close()
    candidates = answer_candidates(answer)
    ports = {port for _, port, _ in candidates}
    assert {address for address, _, _ in candidates} == {"127.0.0.1", "203.0.113.7"}
    assert len(ports) == 1  # bundled: one socket, advertised under both addresses


async def test_no_stun_server_is_asked_unless_configured():
    publisher = WebRtcPublisher(RecordingSink(), LOOPBACK)
    try:
        answer = await publisher.answer(FFMPEG_OFFER)
    finally:
        await publisher.close()
    # aiortc's default would add Google's STUN server and a srflx candidate (or a 5 s timeout).
    assert {kind for _, _, kind in answer_candidates(answer)} == {"host"}


# -- media ------------------------------------------------------------------------------------------------

async def publish_into(sink: RecordingSink, video_codec: str | None, audio: bool,
                       settings: WebRtcSettings = LOOPBACK):
    client = await open_client(video_codec, audio)
    publisher = WebRtcPublisher(sink, settings, label="test")
    answer = await publisher.answer(client.localDescription.sdp)
    await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return client, publisher


@pytest.mark.parametrize("codec", ["H264", "VP8"])
async def test_frames_reach_the_sink_from_one_feeder_thread(codec):
    sink = RecordingSink()
    client, publisher = await publish_into(sink, codec, audio=True)
    ended: list[str] = []
    publisher.on_ended(ended.append)
    try:
        await wait_until(lambda: publisher.state is PublisherState.CONNECTED, 10, "connection")
        await wait_until(lambda: sink.count("video") >= 45 and sink.count("audio") >= 60, 15,
                         "frames")
        await asyncio.sleep(1.1)  # one more statistics interval
        stats = publisher.stats()
    finally:
        await client.close()
        await publisher.close("test over")
    assert ended == ["test over"]
    assert publisher.state is PublisherState.CLOSED

    # One producer thread, never the loop's.
    assert len(sink.threads) == 1
    (feeder,) = sink.threads
    assert feeder.startswith("webrtc-feed-") and feeder != threading.main_thread().name
    # The frame rate is measured before the first video frame and told first.
    kinds = [kind for kind, _ in sink.events]
    assert kinds.index("hint") < kinds.index("video")
    assert dict(sink.events)["hint"] == 30.0
    assert sink.video_sizes == {(WIDTH, HEIGHT)}
    assert all(later > earlier for earlier, later in zip(sink.video_times, sink.video_times[1:]))
    assert all(later > earlier for earlier, later in zip(sink.audio_times, sink.audio_times[1:]))
    # Both tracks on one clock: they start together and advance together.
    assert abs(sink.video_times[0] - sink.audio_times[0]) < 0.5
    assert abs(sink.video_times[-1] - sink.audio_times[-1]) < 0.5
    # The picture moves.
    assert np.abs(sink.lumas[0].astype(int) - sink.lumas[-1].astype(int)).mean() > 10

    by_kind = {track.kind: track for track in stats.tracks}
    assert by_kind["video"].codec == codec and by_kind["audio"].codec == "opus"
    assert by_kind["video"].packets_received > 0 and by_kind["audio"].packets_received > 0
    assert by_kind["video"].frame_rate == pytest.approx(30, abs=12)
    assert by_kind["video"].loss == 0 and by_kind["video"].jitter >= 0
    assert by_kind["video"].frames_dropped == 0
    assert stats.bitrate > 10_000 and stats.bytes_received > 0
    assert stats.keyframe_requests >= 1  # a PLI as soon as the video arrived
    assert stats.frame_rate_hint == 30.0 and stats.state == "connected"

    # Nothing reaches the sink once closed.
    count = len(sink.events)
    await asyncio.sleep(0.3)
    assert len(sink.events) == count


@pytest.mark.parametrize("codec, audio, expected", [
    (None, True, {"audio"}),
    ("VP8", False, {"video"}),
])
async def test_audio_only_and_video_only_publishes(codec, audio, expected):
    sink = RecordingSink()
    client, publisher = await publish_into(sink, codec, audio)
    try:
        await wait_until(lambda: all(sink.count(kind) >= 20 for kind in expected), 15, "frames")
    finally:
        await client.close()
        await publisher.close()
    assert {kind for kind, _ in sink.events} - {"hint"} == expected
    assert {track.kind for track in publisher.stats().tracks} == expected


async def test_a_publisher_that_never_connects_is_reaped():
    sink = RecordingSink()
    client = await open_client("VP8", audio=True)  # its answer is never applied: no ICE, no DTLS
    publisher = WebRtcPublisher(sink, WebRtcSettings(hosts=("127.0.0.1",), handshake_timeout=0.5),
                                label="reap")
    ended: list[str] = []
    publisher.on_ended(ended.append)
    started = time.monotonic()
    await publisher.answer(client.localDescription.sdp)
    try:
        await asyncio.wait_for(publisher.wait_closed(), 5)
    finally:
        await client.close()
    assert 0.4 < time.monotonic() - started < 3
    assert ended == ["ICE/DTLS did not complete within 0.5 s"]
    assert publisher.state is PublisherState.CLOSED
    assert sink.events == []
    assert not any(thread.name == "webrtc-feed-reap" for thread in threading.enumerate())


async def test_a_peer_that_hangs_up_ends_the_publisher():
    sink = RecordingSink()
    client, publisher = await publish_into(sink, "VP8", audio=False)
    ended: list[str] = []
    publisher.on_ended(ended.append)
    await wait_until(lambda: sink.count("video") >= 5, 10, "video")
    await client.close()  # aiortc sends a DTLS close_notify
    await asyncio.wait_for(publisher.wait_closed(), 10)
    assert ended and ended[0].startswith("the peer connection")


# -- the feeder -------------------------------------------------------------------------------------------

def _video_frame(seconds: float) -> av.VideoFrame:
    frame = av.VideoFrame(16, 16, "yuv420p")
    frame.pts = round(seconds * 90_000)
    frame.time_base = fractions.Fraction(1, 90_000)
    return frame


def _audio_frame(seconds: float) -> av.AudioFrame:
    frame = av.AudioFrame(format="s16", layout="stereo", samples=960)
    frame.sample_rate = 48_000
    frame.pts = round(seconds * 48_000)
    frame.time_base = fractions.Fraction(1, 48_000)
    return frame


class BlockingSink(RecordingSink):
    """Holds the feeder inside its first audio push until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def push_audio(self, frame: av.AudioFrame) -> None:
        self.entered.set()
        self.release.wait(10)
        super().push_audio(frame)


async def test_a_full_queue_drops_the_oldest_video_frames_and_keeps_audio():
    sink = BlockingSink()
    feeder = FrameFeeder(sink, queue_frames=4, label="drop")
    feeder.put("audio", _audio_frame(0.0))
    assert await asyncio.to_thread(sink.entered.wait, 5)  # the feeder is stuck in that push
    for index in range(6):
        feeder.put("video", _video_frame(index / 30))
    feeder.put("audio", _audio_frame(0.02))
    sink.release.set()
    await feeder.stop()
    # Room for 4: the 3 newest video frames and the audio frame; 3 older video frames dropped.
    assert feeder.video_dropped == 3 and feeder.audio_dropped == 0
    assert sink.audio_times == [0.0, 0.02]
    assert sink.video_times == pytest.approx([3 / 30, 4 / 30, 5 / 30])
    assert sink.count("hint") == 1


async def test_a_queue_of_audio_only_drops_the_oldest_audio():
    sink = BlockingSink()
    feeder = FrameFeeder(sink, queue_frames=2, label="audio-drop")
    feeder.put("audio", _audio_frame(0.0))
    assert await asyncio.to_thread(sink.entered.wait, 5)
    for index in range(1, 5):
        feeder.put("audio", _audio_frame(index * 0.02))
    sink.release.set()
    await feeder.stop()
    assert feeder.audio_dropped == 2
    assert sink.audio_times == pytest.approx([0.0, 0.06, 0.08])


async def test_detach_stops_calls_into_the_sink():
    sink = RecordingSink()
    feeder = FrameFeeder(sink, queue_frames=64, label="detach")
    for index in range(10):
        feeder.put("audio", _audio_frame(index * 0.02))
    await wait_until(lambda: sink.count("audio") == 10, 5, "audio")
    feeder.detach()
    for index in range(10, 20):
        feeder.put("audio", _audio_frame(index * 0.02))
    await feeder.stop()
    assert sink.count("audio") == 10


@pytest.mark.parametrize("times, expected", [
    ([index / 30 for index in range(8)], 30.0),
    ([index * 1001 / 30000 for index in range(8)], 30000 / 1001),
    ([index / 25 for index in range(8)], 25.0),
    ([0.0, 0.04, 0.08, 0.2, 0.24], 25.0),  # one late frame does not move the median
    ([index / 17 for index in range(8)], 17.0),
    ([0.0], None),
    ([0.0, 5.0], None),  # 0.2 fps: not believable
])
def test_frame_rate_estimate(times, expected):
    estimate = estimate_frame_rate(times)
    if expected is None:
        assert estimate is None
    else:
        assert estimate == pytest.approx(expected, abs=0.01)
