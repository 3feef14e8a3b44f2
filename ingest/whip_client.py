"""A WHIP client (RFC 9725) with aiortc: push any FFmpeg-readable source to a WHIP endpoint.

``livedge publish`` uses it. The source is read and paced by aiortc's ``MediaPlayer`` (FFmpeg through
PyAV), encoded by aiortc (VP8 or H.264 and Opus), and sent over WebRTC. No HTTP server or HLS here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urljoin

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from aiortc.rtcrtpsender import RTCRtpSender

from ingest.webrtc import gathering_on

log = logging.getLogger("livedge.whip_client")

VIDEO_CODECS = ("H264", "VP8")


class WhipClientError(RuntimeError):
    pass


@dataclass(frozen=True)
class WhipSession:
    location: str  # absolute URL of the session resource (DELETE it to stop)
    etag: str | None


def _prefer(pc: RTCPeerConnection, video_codec: str) -> None:
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "video":
            continue
        capabilities = RTCRtpSender.getCapabilities("video").codecs
        chosen = [c for c in capabilities if c.mimeType.lower() == f"video/{video_codec.lower()}"]
        if video_codec == "H264":
            # Baseline with packetization-mode 1: what every WHIP server accepts.
            chosen = [c for c in chosen if "42" in (c.parameters or {}).get("profile-level-id", "")
                      and str((c.parameters or {}).get("packetization-mode")) == "1"] or chosen
        transceiver.setCodecPreferences(chosen + [c for c in capabilities if c.name == "rtx"])


async def _gathered(pc: RTCPeerConnection) -> None:
    # aiortc gathers during setLocalDescription; wait in case a newer version trickles.
    while pc.iceGatheringState != "complete":
        await asyncio.sleep(0.05)


async def publish(source: str, endpoint: str, token: str | None, *, video_codec: str = "H264",
                  source_format: str | None = None, loop_input: bool = False,
                  ice_hosts: Sequence[str] = (), stop: asyncio.Event | None = None) -> None:
    """Publish ``source`` to the WHIP ``endpoint`` until the source ends, ``stop`` is set, or the
    connection fails; then DELETE the session. ``ice_hosts`` limits our host candidates (e.g.
    127.0.0.1); by default every interface is offered."""
    if video_codec not in VIDEO_CODECS:
        raise WhipClientError(f"video codec must be one of {', '.join(VIDEO_CODECS)}")
    player = MediaPlayer(source, format=source_format, loop=loop_input)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no public STUN unless asked
    done = stop or asyncio.Event()
    headers = {"Content-Type": "application/sdp"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    session: WhipSession | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        try:
            if player.video is not None:
                pc.addTransceiver(player.video, direction="sendonly")
            if player.audio is not None:
                pc.addTransceiver(player.audio, direction="sendonly")
            if not pc.getTransceivers():
                raise WhipClientError(f"{source} has neither audio nor video")
            _prefer(pc, video_codec)

            @pc.on("connectionstatechange")
            def _state() -> None:
                log.info("connection %s", pc.connectionState)
                if pc.connectionState in ("failed", "closed"):
                    done.set()

            for track in (player.video, player.audio):
                if track is not None:
                    track.on("ended", done.set)
            with gathering_on(list(ice_hosts) or None):
                await pc.setLocalDescription(await pc.createOffer())
                await _gathered(pc)
            async with http.post(endpoint, data=pc.localDescription.sdp,
                                 headers=headers) as response:
                body = await response.text()
                if response.status != 201:
                    raise WhipClientError(f"{response.status} from {endpoint}: {body[:300]}")
                location = urljoin(endpoint, response.headers.get("Location", ""))
                session = WhipSession(location, response.headers.get("ETag"))
            await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
            await done.wait()
        finally:
            if session is not None:
                try:
                    async with http.delete(session.location, headers={
                            k: v for k, v in headers.items() if k == "Authorization"}):
                        pass
                except aiohttp.ClientError as error:
                    log.warning("DELETE %s failed: %s", session.location, error)
            await pc.close()
            for track in (player.video, player.audio):
                if track is not None:
                    track.stop()
