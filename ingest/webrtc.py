"""WebRTC ingest, the media half of WHIP: an SDP offer in, an SDP answer out, decoded frames to a sink.

No HTTP here (``edge/whip.py`` speaks WHIP and drives this). One ``WebRtcPublisher`` wraps one aiortc
``RTCPeerConnection`` that only receives: at most one audio (Opus) and one video (H.264 or VP8) track.

Threads. aiortc depacketizes on the event loop, decodes in its own threads and hands decoded frames
back to the loop (``await track.recv()``). A sink such as ``LadderTranscoder`` must be driven by ONE
producer thread that is not the loop, so every publisher forwards frames through a bounded
``FrameQueue`` to its own feeder thread. The loop never waits for the sink: when the queue is full the
oldest video frame is dropped and counted (audio is small and a gap in it is audible).

Timestamps. aiortc stamps each track's frames from 0 at that track's first frame (RTP timestamps
unwrapped), and a sender's RTP clocks start at random, unrelated values. aiortc does not expose the
RTCP sender-report mapping that would align the tracks exactly, so each track is anchored on the
arrival time of its first decoded frame; the tracks then share one clock (seconds since the first frame
of any track) and keep the sender's own spacing.

ICE. Host candidates come from ``WebRtcSettings.hosts`` (``WEBRTC_HOSTS``): addresses of this machine
are gathered on (loopback included, which aioice skips by itself); addresses that are not (a 1:1 NAT's
public address) are advertised with the ports of the candidates gathered locally. No STUN or TURN
server is used unless configured (aiortc would otherwise ask Google's STUN server).

Interop facts (each stamped by a test in tests/test_webrtc.py or tests/test_whip.py):
- FFmpeg's ``whip`` muxer offers no candidates and ``a=setup:passive``: it is the DTLS server, the
  answer says ``a=setup:active`` and its address is learnt from its STUN checks (peer-reflexive).
- FFmpeg linked with GnuTLS (PyAV's wheels) self-signs a P-224 certificate; OpenSSL under aiortc aborts
  that DTLS handshake with an illegal_parameter alert. Such publishers must pass ``cert_file`` and
  ``key_file`` with a P-256 certificate.
- aiortc receives H.264 only with packetization-mode 1 in the baseline or constrained baseline profile
  (as signalled in the offer; the decoder itself takes any profile), so FFmpeg/libx264 publishers need
  ``-profile:v baseline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import hashlib
import ipaddress
import logging
import queue
import re
import socket
import statistics
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import aioice.ice
import av
from aiortc import (RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpReceiver,
                    RTCSessionDescription)
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecCapability, RTCRtpCodecParameters

log = logging.getLogger("livedge.webrtc")

HANDSHAKE_TIMEOUT = 15.0  # seconds from the answer until ICE and DTLS must be done
FEED_QUEUE_FRAMES = 128  # decoded frames between the loop and the feeder (~1.5 s of audio + video)
FEEDER_JOIN_TIMEOUT = 15.0  # seconds to wait for the feeder thread to hand over its last frames
STATS_INTERVAL = 1.0  # seconds between two reads of aiortc's RTCP statistics
KEYFRAME_REQUESTS = 5  # PLIs sent, one per KEYFRAME_RETRY, until the first video frame decodes
KEYFRAME_RETRY = 1.0  # seconds
FRAME_RATE_PROBE_FRAMES = 8  # video frames looked at to estimate the frame rate before the first push
FRAME_RATE_PROBE_SECONDS = 0.5  # ... or this much media time, whichever comes first
MIN_FRAME_RATE, MAX_FRAME_RATE = 1.0, 120.0
COMMON_FRAME_RATES = (10.0, 12.0, 15.0, 20.0, 24000 / 1001, 24.0, 25.0, 30000 / 1001, 30.0,
                      48.0, 50.0, 60000 / 1001, 60.0, 120.0)
ACCEPTED_CODECS = ("H.264 (packetization-mode=1, baseline or constrained baseline profile) or VP8 "
                   "video, and Opus audio")
_MEDIA_KINDS = ("audio", "video")
_RECEIVING_DIRECTIONS = (None, "sendonly", "sendrecv")  # the offerer's direction; None = sendrecv
_H264_PROFILES = (aiortc_sdp.H264Profile.PROFILE_BASELINE,
                  aiortc_sdp.H264Profile.PROFILE_CONSTRAINED_BASELINE)
_SHOWN_CODEC_NAMES = 8  # offered codec names listed in a rejection message


class OfferRejected(ValueError):
    """The offer cannot be answered. ``str()`` says why, in words meant for the publisher."""


class WebRtcError(RuntimeError):
    """The answer could not be made for a reason on our side (no usable ICE candidate)."""


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server: ``stun:host[:port]``, ``turn:host[:port][?transport=udp|tcp]`` or
    ``turns:host[:port]``. TURN needs ``username`` and ``credential`` (long-term password)."""

    url: str
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class WebRtcSettings:
    """``hosts``: addresses or names advertised as host candidates (``WEBRTC_HOSTS``); empty means
    every interface of the machine. ``ice_servers``: used by us too (aiortc uses the first STUN and the
    first TURN server with credentials). ``handshake_timeout`` in seconds; ``queue_frames`` bounds the feeder queue."""

    hosts: tuple[str, ...] = ()
    ice_servers: tuple[IceServer, ...] = ()
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    queue_frames: int = FEED_QUEUE_FRAMES


# -- the offer: checked before anything is allocated (pure) -------------------------------------------

@dataclass(frozen=True)
class OfferSummary:
    """What an acceptable offer sends: the media kinds in m-line order, the codecs we can take from
    each (names as offered, e.g. ``("H264", "VP8")``), and the offerer's DTLS setup attribute."""

    kinds: tuple[str, ...]
    codecs: tuple[tuple[str, ...], ...]
    setup: str  # "actpass", "active" or "passive"
    candidates: int  # ICE candidates in the offer (0 for FFmpeg and trickling clients)


def inspect_offer(text: str) -> OfferSummary:
    """Check that ``text`` is an SDP offer we can answer: one audio and/or one video section, each
    sending, with ICE credentials, a DTLS fingerprint, rtcp-mux and a codec of ``ACCEPTED_CODECS``.
    Raises ``OfferRejected`` naming the first problem."""
    if not text.lstrip().startswith("v=0"):
        raise OfferRejected("the body is not an SDP offer (it must start with v=0)")
    try:
        description = aiortc_sdp.SessionDescription.parse(text)
    except Exception:  # noqa: BLE001 - aiortc's parser raises anything from asserts to KeyError
        raise OfferRejected("the SDP offer cannot be parsed") from None
    media = [section for section in description.media if section.kind in _MEDIA_KINDS]
    if not media:
        raise OfferRejected(f"the offer has no audio or video section; this server receives "
                            f"{ACCEPTED_CODECS}")
    for kind in _MEDIA_KINDS:
        count = sum(section.kind == kind for section in media)
        if count > 1:
            raise OfferRejected(f"the offer has {count} {kind} sections; WHIP publishes at most one "
                                "audio and one video track")
    codecs: list[tuple[str, ...]] = []
    for section in media:
        kind = section.kind
        if section.direction not in _RECEIVING_DIRECTIONS:
            raise OfferRejected(f"the {kind} section does not send media (a={section.direction})")
        if not (section.ice and section.ice.usernameFragment and section.ice.password):
            raise OfferRejected(f"the {kind} section has no ICE credentials (a=ice-ufrag/a=ice-pwd)")
        if not (section.dtls and section.dtls.fingerprints):
            raise OfferRejected(f"the {kind} section has no DTLS fingerprint (a=fingerprint)")
        if not section.rtcp_mux:
            raise OfferRejected(f"the {kind} section does not use a=rtcp-mux")
        usable = tuple(dict.fromkeys(codec.name for codec in section.rtp.codecs
                                     if codec_acceptable(kind, codec)))
        if not usable:
            offered = _codec_names(section.rtp.codecs)
            raise OfferRejected(f"the {kind} section offers {offered or 'no codec'}; this server "
                                f"accepts {ACCEPTED_CODECS}")
        codecs.append(usable)
    setups = {section.dtls.role for section in media}
    setup = {"auto": "actpass", "client": "active", "server": "passive"}.get(
        setups.pop() if len(setups) == 1 else "auto", "actpass")
    return OfferSummary(kinds=tuple(section.kind for section in media), codecs=tuple(codecs),
                        setup=setup,
                        candidates=sum(len(section.ice_candidates) for section in media))


def codec_acceptable(kind: str, codec: RTCRtpCodecParameters | RTCRtpCodecCapability) -> bool:
    """Whether aiortc can receive ``codec`` (an offered payload type) into our pipeline."""
    name = codec.name.lower()
    if kind == "audio":
        return name == "opus" and codec.clockRate == 48_000
    if name == "vp8":
        return codec.clockRate == 90_000
    if name != "h264" or codec.clockRate != 90_000:
        return False
    if str(codec.parameters.get("packetization-mode", "0")) != "1":
        return False
    # aiortc reads a missing profile-level-id as constrained baseline 3.1 (what older WebRTC stacks
    # meant); RFC 6184's own default, baseline level 1.0, is in the accepted family as well.
    try:
        profile, _ = aiortc_sdp.parse_h264_profile_level_id(
            str(codec.parameters.get("profile-level-id", "42e01f")))
    except ValueError:
        return False
    return profile in _H264_PROFILES


def _codec_names(codecs: Sequence[RTCRtpCodecParameters]) -> str:
    """Offered codec names for a message: the media codecs (not rtx/red/fec), sanitised, capped."""
    names = [re.sub(r"[^A-Za-z0-9_.-]", "", codec.name)[:20] for codec in codecs]
    names = [name for name in dict.fromkeys(names)
             if name and name.lower() not in ("rtx", "red", "ulpfec", "flexfec-03")]
    shown = ", ".join(names[:_SHOWN_CODEC_NAMES])
    return shown + (", ..." if len(names) > _SHOWN_CODEC_NAMES else "")


def _codec_preferences(kind: str) -> list[RTCRtpCodecCapability]:
    """aiortc's receive capabilities for ``kind`` restricted to what we accept (plus RTX, which keeps
    retransmissions negotiable), for ``RTCRtpTransceiver.setCodecPreferences``."""
    return [capability for capability in RTCRtpReceiver.getCapabilities(kind).codecs
            if capability.name.lower() == "rtx" or codec_acceptable(kind, capability)]


# -- host candidates ------------------------------------------------------------------------------------

# aioice asks its module-level get_host_addresses() which local addresses to gather on, and skips
# 127.0.0.1. This hook answers from a context variable instead when one is set, so a session can
# choose its own addresses without touching any other connection in the process. The variable is read
# in the tasks aiortc starts from setLocalDescription(), which inherit the caller's context.
_gather_addresses: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "livedge_gather_addresses", default=None)
_aioice_host_addresses = aioice.ice.get_host_addresses
_hook_lock = threading.Lock()


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    chosen = _gather_addresses.get()
    if chosen is None:
        return _aioice_host_addresses(use_ipv4, use_ipv6)
    return [address for address in chosen
            if (use_ipv4 if ipaddress.ip_address(address).version == 4 else use_ipv6)]


def _install_host_hook() -> None:
    with _hook_lock:
        if aioice.ice.get_host_addresses is not _host_addresses:
            aioice.ice.get_host_addresses = _host_addresses


@contextlib.contextmanager
def gathering_on(addresses: Sequence[str] | None) -> Iterator[None]:
    """ICE host candidates gathered inside this block (by ``setLocalDescription``) bind exactly
    ``addresses`` (IP literals; loopback allowed). ``None`` keeps aioice's default: every non-loopback
    interface. Usable by clients too (tests publish from 127.0.0.1 with it)."""
    _install_host_hook()
    token = _gather_addresses.set(tuple(addresses) if addresses is not None else None)
    try:
        yield
    finally:
        _gather_addresses.reset(token)


@dataclass(frozen=True)
class HostPlan:
    """Where to gather and what to advertise. ``gather``: local addresses to bind (``None``: every
    interface). ``external``: addresses not on this machine, advertised with the ports gathered
    locally (a 1:1 NAT forwards them). ``keep_gathered``: advertise the gathered host candidates too."""

    gather: tuple[str, ...] | None
    external: tuple[str, ...] = ()
    keep_gathered: bool = True


async def plan_hosts(hosts: Sequence[str]) -> HostPlan:
    """Resolve ``hosts`` (IP literals or names) and split them into addresses of this machine (one
    can bind them) and external ones. Raises ``WebRtcError`` when none resolves."""
    if not hosts:
        return HostPlan(gather=None)
    loop = asyncio.get_running_loop()
    local: list[str] = []
    external: list[str] = []
    for host in hosts:
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        except OSError as error:
            log.warning("WebRTC host %r does not resolve: %s", host, error)
            continue
        for family, _, _, _, address in infos:
            ip = str(ipaddress.ip_address(address[0].split("%")[0]))
            target = local if _can_bind(family, ip) else external
            if ip not in local and ip not in external:
                target.append(ip)
    if not local and not external:
        raise WebRtcError("none of the configured WebRTC host addresses resolves")
    return HostPlan(gather=tuple(local) if local else None, external=tuple(external),
                    keep_gathered=bool(local))


def _can_bind(family: int, ip: str) -> bool:
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


def advertise_candidates(answer: str, external: Sequence[str], keep_gathered: bool = True) -> str:
    """The answer with its host candidates as planned (pure): each host candidate is copied once per
    ``external`` address of the same IP family (same port, own foundation), and the gathered ones
    stay only when ``keep_gathered``. Server-reflexive and relay candidates are kept. Each media
    section's ``c=`` line and m-line port follow its first remaining candidate."""
    if not external and keep_gathered:
        return answer
    newline = "\r\n" if "\r\n" in answer else "\n"
    lines = answer.split(newline)
    starts = [index for index, line in enumerate(lines) if line.startswith("m=")]
    if not starts:
        return answer
    output = lines[:starts[0]]
    for begin, end in zip(starts, [*starts[1:], len(lines)]):
        output.extend(_rewrite_section(lines[begin:end], external, keep_gathered))
    return newline.join(output)


def _rewrite_section(lines: list[str], external: Sequence[str], keep_gathered: bool) -> list[str]:
    candidates: list[str] = []
    for line in lines:
        if not line.startswith("a=candidate:"):
            continue
        fields = line[len("a=candidate:"):].split()
        if len(fields) < 8 or fields[6] != "typ" or fields[7] != "host":
            candidates.append(line)  # srflx and relay candidates are the STUN/TURN servers' view
            continue
        if keep_gathered:
            candidates.append(line)
        family = ipaddress.ip_address(fields[4]).version
        for address in external:
            if ipaddress.ip_address(address).version == family:
                # A foundation names one base address (RFC 8445 5.1.1.3): the copy needs its own.
                foundation = hashlib.md5(f"{fields[0]} {address}".encode()).hexdigest()
                candidates.append("a=candidate:" + " ".join([foundation, *fields[1:4], address,
                                                              *fields[5:]]))
    result = [line for line in lines if not line.startswith("a=candidate:")]
    if not candidates:
        return result
    insert_at = next((index for index, line in enumerate(lines) if line.startswith("a=candidate:")),
                     len(result))
    result[insert_at:insert_at] = candidates
    first = candidates[0][len("a=candidate:"):].split()
    address, port = first[4], first[5]
    version = "IP6" if ipaddress.ip_address(address).version == 6 else "IP4"
    for index, line in enumerate(result):
        if line.startswith("m="):
            parts = line.split(" ")
            parts[1] = port
            result[index] = " ".join(parts)
        elif line.startswith("c="):
            result[index] = f"c=IN {version} {address}"
    return result


def answer_candidates(answer: str) -> list[tuple[str, int, str]]:
    """(address, port, type) of every candidate in an SDP (pure; for checks and tests)."""
    found = []
    for line in answer.splitlines():
        if line.startswith("a=candidate:"):
            fields = line.split()
            if len(fields) >= 8:
                found.append((fields[4], int(fields[5]), fields[7]))
    return found


def negotiated_codecs(answer: str) -> dict[str, str]:
    """The codec each audio/video section of an answer settled on (its first, non-RTX payload)."""
    chosen = {}
    for section in aiortc_sdp.SessionDescription.parse(answer).media:
        names = [codec.name for codec in section.rtp.codecs if codec.name.lower() != "rtx"]
        if section.kind in _MEDIA_KINDS and names:
            chosen[section.kind] = names[0]
    return chosen


# -- frames from the loop to one feeder thread ---------------------------------------------------------

class FrameSink(Protocol):
    """What a publisher feeds; ``LadderTranscoder`` is one. Called from the feeder thread only."""

    def hint_frame_rate(self, frames_per_second: float | None) -> None: ...
    def push_video(self, frame: av.VideoFrame) -> None: ...
    def push_audio(self, frame: av.AudioFrame) -> None: ...


@dataclass(frozen=True, eq=False)  # identity: the queue removes one particular item
class _Item:
    kind: str  # "audio" | "video"
    frame: av.AudioFrame | av.VideoFrame


_STOP = object()


class FrameQueue(queue.Queue):
    """A bounded queue whose producer never waits: ``offer`` makes room by dropping the oldest video
    frame (the oldest frame when it holds no video), so the event loop is never blocked by a slow sink.
    Control items (the stop marker) never displace a frame; they may exceed the bound."""

    def offer(self, item: object) -> object | None:
        """Queue ``item``; return the frame dropped to make room, or ``None``."""
        with self.mutex:
            dropped = None
            if isinstance(item, _Item) and 0 < self.maxsize <= self._qsize():
                frames = [queued for queued in self.queue if isinstance(queued, _Item)]
                victim = next((queued for queued in frames if queued.kind == "video"),
                              frames[0] if frames else None)
                if victim is not None:
                    self.queue.remove(victim)
                    dropped = victim
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()
            return dropped


class FrameFeeder:
    """One thread that hands queued frames to the sink in arrival order. Before the first video frame
    it estimates the frame rate (aiortc's frames carry no duration) and tells the sink."""

    def __init__(self, sink: FrameSink, queue_frames: int, label: str) -> None:
        self._sink = sink
        self._queue = FrameQueue(maxsize=queue_frames)
        self._push_lock = threading.Lock()
        self._detached = False
        self._probe: list[av.VideoFrame] | None = []  # None once the frame rate is known
        self.video_dropped = 0
        self.audio_dropped = 0
        self.frame_rate: float | None = None
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"webrtc-feed-{label}", daemon=True)
        self._thread.start()

    # loop side
    def put(self, kind: str, frame: av.AudioFrame | av.VideoFrame) -> None:
        dropped = self._queue.offer(_Item(kind, frame))
        if isinstance(dropped, _Item):
            if dropped.kind == "video":
                self.video_dropped += 1
            else:
                self.audio_dropped += 1

    def detach(self) -> None:
        """Stop calling the sink: returns once no call is in progress and none will follow. Blocks
        at most for the sink call under way (a frame push, normally well under a frame interval)."""
        self._detached = True
        with self._push_lock:
            pass

    async def stop(self) -> None:
        """Hand over what is queued, then end the thread."""
        self._queue.offer(_STOP)
        await asyncio.to_thread(self._thread.join, FEEDER_JOIN_TIMEOUT)
        if self._thread.is_alive():
            self.last_error = "the feeder did not finish in time"

    # feeder thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                if self._probe:
                    self._deliver(self._release_probe)
                return
            assert isinstance(item, _Item)
            if item.kind == "video":
                self._deliver(self._video, item.frame)
            else:
                self._deliver(self._sink.push_audio, item.frame)

    def _deliver(self, call: Callable[..., None], *args: object) -> None:
        with self._push_lock:
            if self._detached:
                return
            try:
                call(*args)
            except Exception as exc:  # noqa: BLE001 - a bad frame or a closed sink must not kill us
                self.last_error = f"{type(exc).__name__}: {exc}"

    def _video(self, frame: av.VideoFrame) -> None:
        if self._probe is None:
            self._sink.push_video(frame)
            return
        self._probe.append(frame)
        span = float(self._probe[-1].time or 0.0) - float(self._probe[0].time or 0.0)
        if len(self._probe) >= FRAME_RATE_PROBE_FRAMES or span >= FRAME_RATE_PROBE_SECONDS:
            self._release_probe()

    def _release_probe(self) -> None:
        frames, self._probe = self._probe or [], None
        self.frame_rate = estimate_frame_rate([float(frame.time or 0.0) for frame in frames])
        self._sink.hint_frame_rate(self.frame_rate)
        for frame in frames:
            self._sink.push_video(frame)


def estimate_frame_rate(times: Sequence[float]) -> float | None:
    """Frames per second from consecutive frame times in seconds (median interval), snapped to a
    common rate within 3 %; ``None`` when there are too few frames or the rate is implausible."""
    intervals = [later - earlier for earlier, later in zip(times, times[1:]) if later > earlier]
    if not intervals:
        return None
    rate = 1.0 / statistics.median(intervals)
    if not MIN_FRAME_RATE <= rate <= MAX_FRAME_RATE:
        return None
    nearest = min(COMMON_FRAME_RATES, key=lambda common: abs(common - rate))
    return nearest if abs(nearest - rate) <= 0.03 * nearest else round(rate, 2)


# -- statistics -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrackStats:
    """One received track. ``loss`` is the fraction of packets lost over the last interval (0..1),
    ``jitter`` RTP interarrival jitter in seconds, ``frame_rate`` decoded frames per second over the
    last interval, ``frames_dropped`` frames dropped because the feeder queue was full."""

    kind: str
    codec: str
    packets_received: int = 0
    packets_lost: int = 0
    loss: float = 0.0
    jitter: float = 0.0
    frames: int = 0
    frame_rate: float = 0.0
    frames_dropped: int = 0


@dataclass(frozen=True)
class PublisherStats:
    """A snapshot, refreshed every ``STATS_INTERVAL`` from aiortc's statistics; safe to read from
    any thread. ``bitrate`` is bits per second received over the last interval (all tracks, SRTP
    payload and headers); ``keyframe_requests`` counts the PLIs we sent."""

    state: str
    bitrate: float = 0.0
    bytes_received: int = 0
    keyframe_requests: int = 0
    frame_rate_hint: float | None = None
    tracks: tuple[TrackStats, ...] = ()
    last_error: str | None = None


@dataclass
class _TrackCounters:
    kind: str
    codec: str = ""
    frames: int = 0
    clock_anchor: float | None = None  # seconds on the session clock of this track's frame time 0
    previous_frames: int = 0
    previous_received: int = 0
    previous_lost: int = 0
    last: TrackStats | None = None


# -- the publisher ----------------------------------------------------------------------------------------

class PublisherState(enum.Enum):
    NEW = "new"  # before answer()
    CONNECTING = "connecting"  # answered; ICE/DTLS under way
    CONNECTED = "connected"  # media can flow
    CLOSED = "closed"


class WebRtcPublisher:
    """One WHIP publisher's peer connection: ``answer(offer)`` once, then frames flow to ``sink``
    until ``close()``, the peer goes away, or the handshake times out. ``on_ended`` callbacks run on
    the loop exactly once, after the last frame was handed to the sink."""

    def __init__(self, sink: FrameSink, settings: WebRtcSettings = WebRtcSettings(), *,
                 label: str = "") -> None:
        self._sink = sink
        self._settings = settings
        self._label = label or "publisher"
        self._state = PublisherState.NEW
        self._pc: RTCPeerConnection | None = None
        self._feeder: FrameFeeder | None = None
        self._tracks: dict[str, _TrackCounters] = {}
        self._media_start: float | None = None  # loop time of the first frame of any track
        self._first_video = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._ended_callbacks: list[Callable[[str], None]] = []
        self._closing = False
        self._closed = asyncio.Event()
        self._keyframe_requests = 0
        self._bytes_received = 0
        self._bitrate = 0.0
        self._last_error: str | None = None
        self.end_reason: str | None = None

    @property
    def state(self) -> PublisherState:
        return self._state

    def on_ended(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` runs once on the loop when the publisher has ended for any reason."""
        self._ended_callbacks.append(callback)

    async def answer(self, offer: str) -> str:
        """The SDP answer to ``offer``, with every ICE candidate (WHIP has no server-side trickle).
        Raises ``OfferRejected`` (the offer is unusable) or ``WebRtcError`` (no candidate to offer);
        the publisher is closed then. Starts the handshake timeout."""
        if self._state is not PublisherState.NEW:
            raise RuntimeError("answer() was already called")
        summary = inspect_offer(offer)
        plan = await plan_hosts(self._settings.hosts)
        self._pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=_aiortc_ice_servers(
            self._settings.ice_servers)))
        self._state = PublisherState.CONNECTING
        for kind in summary.kinds:
            transceiver = pc.addTransceiver(kind, direction="recvonly")
            transceiver.setCodecPreferences(_codec_preferences(kind))
            self._tracks[kind] = _TrackCounters(kind)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            with gathering_on(plan.gather):
                await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # noqa: BLE001 - aiortc reports a bad offer in many ways
            await self.close("the offer was rejected")
            log.info("offer rejected by aiortc (%s): %r", self._label, exc)
            raise OfferRejected(f"the offer cannot be negotiated: {type(exc).__name__}") from None
        answer = advertise_candidates(pc.localDescription.sdp, plan.external, plan.keep_gathered)
        if not answer_candidates(answer):
            await self.close("no ICE candidate")
            raise WebRtcError("no ICE candidate could be gathered (check WEBRTC_HOSTS)")
        for kind, codec in negotiated_codecs(answer).items():
            if kind in self._tracks:
                self._tracks[kind].codec = codec
        self._feeder = FrameFeeder(self._sink, self._settings.queue_frames, self._label)
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self._settings.handshake_timeout, self._handshake_expired)
        self._spawn(self._poll_stats(), "stats")
        return answer

    def detach(self) -> None:
        """Stop feeding the sink now (the publication was taken over or the node is shutting down and
        the sink is about to be closed by someone else); then close() as usual."""
        if self._feeder is not None:
            self._feeder.detach()

    async def close(self, reason: str = "closed") -> None:
        """End the session: close the peer connection, hand the queued frames to the sink, stop the
        feeder thread, then run the ``on_ended`` callbacks. Idempotent; later calls wait for the first."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.end_reason = reason
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self._pc is not None:
            try:
                await self._pc.close()
            except Exception as exc:  # noqa: BLE001 - closing must always finish
                self._last_error = f"closing the peer connection: {exc!r}"
        await asyncio.gather(*(task for task in self._tasks if task is not current),
                             return_exceptions=True)
        if self._feeder is not None:
            await self._feeder.stop()
        self._state = PublisherState.CLOSED
        self._closed.set()
        log.info("webrtc publisher %s ended: %s", self._label, reason)
        for callback in self._ended_callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("on_ended callback of %s failed", self._label)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def stats(self) -> PublisherStats:
        feeder = self._feeder
        tracks = []
        for counters in self._tracks.values():
            last = counters.last or TrackStats(counters.kind, counters.codec)
            dropped = 0
            if feeder is not None:
                dropped = feeder.video_dropped if counters.kind == "video" else feeder.audio_dropped
            tracks.append(TrackStats(
                kind=counters.kind, codec=counters.codec, packets_received=last.packets_received,
                packets_lost=last.packets_lost, loss=last.loss, jitter=last.jitter,
                frames=counters.frames, frame_rate=last.frame_rate, frames_dropped=dropped))
        return PublisherStats(
            state=self._state.value, bitrate=self._bitrate, bytes_received=self._bytes_received,
            keyframe_requests=self._keyframe_requests,
            frame_rate_hint=feeder.frame_rate if feeder else None, tracks=tuple(tracks),
            last_error=(feeder.last_error if feeder and feeder.last_error else self._last_error))

    # -- internals ----------------------------------------------------------------------------------

    def _spawn(self, coroutine, name: str) -> None:
        task = asyncio.create_task(coroutine, name=f"webrtc-{name}-{self._label}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handshake_expired(self) -> None:
        if self._state is PublisherState.CONNECTING and not self._closing:
            timeout = self._settings.handshake_timeout
            self._spawn(self.close(f"ICE/DTLS did not complete within {timeout:g} s"), "reap")

    def _on_connection_state(self) -> None:
        pc = self._pc
        if pc is None or self._closing:
            return
        if pc.connectionState == "connected" and self._state is PublisherState.CONNECTING:
            self._state = PublisherState.CONNECTED
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
            video = next((t.receiver for t in pc.getTransceivers() if t.kind == "video"), None)
            if video is not None:
                self._spawn(self._request_keyframes(video), "pli")
        elif pc.connectionState in ("failed", "closed"):
            self._spawn(self.close(_connection_end_reason(pc)), "close")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind in self._tracks:
            self._spawn(self._read_track(track), f"read-{track.kind}")

    async def _read_track(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        counters = self._tracks[track.kind]
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            arrival = loop.time()
            if self._media_start is None:
                self._media_start = arrival
            if frame.pts is None or frame.time_base is None:
                continue  # aiortc always stamps frames; an unstamped one cannot be placed
            if counters.clock_anchor is None:
                counters.clock_anchor = (arrival - self._media_start) - float(frame.time)
            frame.pts = round((counters.clock_anchor + float(frame.time)) / frame.time_base)
            counters.frames += 1
            if track.kind == "video":
                self._first_video.set()
            if self._feeder is not None:
                self._feeder.put(track.kind, frame)

    async def _request_keyframes(self, receiver: RTCRtpReceiver) -> None:
        """Ask the publisher for a keyframe as soon as its video arrives, so the transcoder starts
        on an IDR instead of waiting for the publisher's next one; again every ``KEYFRAME_RETRY``
        until a frame decodes. aiortc sends PLIs itself only after decode errors, and the sending
        method is private (``RTCRtpReceiver._send_rtcp_pli``)."""
        send_pli = getattr(receiver, "_send_rtcp_pli", None)
        if send_pli is None:
            return
        for _ in range(KEYFRAME_REQUESTS):
            while not receiver.getSynchronizationSources():  # no video packet yet
                await asyncio.sleep(0.05)
            for source in receiver.getSynchronizationSources():
                await send_pli(source.source)
                self._keyframe_requests += 1
            try:
                await asyncio.wait_for(self._first_video.wait(), KEYFRAME_RETRY)
                return
            except asyncio.TimeoutError:
                continue

    async def _poll_stats(self) -> None:
        loop = asyncio.get_running_loop()
        previous_time = loop.time()
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            pc = self._pc
            if pc is None:
                return
            try:
                report = await pc.getStats()
            except Exception as exc:  # noqa: BLE001 - statistics must never end a session
                self._last_error = f"statistics: {exc!r}"
                continue
            now = loop.time()
            elapsed = max(now - previous_time, 1e-6)
            previous_time = now
            self._apply_stats(report.values(), elapsed)

    def _apply_stats(self, entries, elapsed: float) -> None:
        received_bytes = 0
        inbound: dict[str, list] = {}
        for entry in entries:
            if entry.type == "transport":
                received_bytes += entry.bytesReceived
            elif entry.type == "inbound-rtp":
                inbound.setdefault(entry.kind, []).append(entry)
        if received_bytes:
            self._bitrate = 8 * max(0, received_bytes - self._bytes_received) / elapsed
            self._bytes_received = received_bytes
        for kind, counters in self._tracks.items():
            streams = inbound.get(kind, [])
            received = sum(s.packetsReceived for s in streams)
            lost = sum(max(0, s.packetsLost) for s in streams)
            clock_rate = 90_000 if kind == "video" else 48_000
            jitter = max((s.jitter for s in streams), default=0) / clock_rate
            delta_received = received - counters.previous_received
            delta_lost = lost - counters.previous_lost
            expected = delta_received + max(0, delta_lost)
            counters.last = TrackStats(
                kind=kind, codec=counters.codec, packets_received=received, packets_lost=lost,
                loss=max(0, delta_lost) / expected if expected > 0 else 0.0, jitter=jitter,
                frames=counters.frames,
                frame_rate=(counters.frames - counters.previous_frames) / elapsed)
            counters.previous_received, counters.previous_lost = received, lost
            counters.previous_frames = counters.frames


def _connection_end_reason(pc: RTCPeerConnection) -> str:
    """Why a peer connection ended, precise enough for an operator to act on."""
    states = {transceiver.receiver.transport.state for transceiver in pc.getTransceivers()}
    if pc.connectionState == "failed" and "failed" in states:
        # OpenSSL refuses e.g. the P-224 certificate FFmpeg+GnuTLS publishers make for themselves.
        return "the peer connection failed: DTLS handshake failed"
    if pc.connectionState == "failed" and pc.iceConnectionState == "failed":
        return "the peer connection failed: ICE failed (consent lost or no working pair)"
    return f"the peer connection {pc.connectionState}"


def _aiortc_ice_servers(servers: Sequence[IceServer]) -> list[RTCIceServer]:
    """Our servers for aiortc: a list, never ``None`` (which means Google's STUN server). A TURN
    server without credentials is left out: it would refuse the allocation after a round trip."""
    return [RTCIceServer(urls=server.url, username=server.username, credential=server.credential)
            for server in servers
            if not server.url.startswith("turn") or (server.username and server.credential)]
