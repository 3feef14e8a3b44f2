"""Publish webhooks, like nginx-rtmp's and SRS's callbacks.

``on_publish`` is asked before a publish starts: any answer but 2xx rejects it, and the answer's JSON
``message`` (or text) is the reason the publisher sees. ``on_unpublish`` is told, fire-and-forget,
whenever a publication ends: its publisher left, a new publisher took it over, or the node shut
down. Both receive JSON: ``{"action", "stream", "subject", "address", "kind"}``; on_unpublish adds
``reason``.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp

from edge.errors import Forbidden, Unavailable

log = logging.getLogger("livedge.webhooks")

TIMEOUT_SECONDS = 5.0
REASON_MAX_CHARS = 200


class Webhooks:
    def __init__(self, on_publish_url: str | None, on_unpublish_url: str | None) -> None:
        self._on_publish_url = on_publish_url
        self._on_unpublish_url = on_unpublish_url
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS))
        return self._session

    async def on_publish(self, stream: str, subject: str, address: str, kind: str) -> None:
        """Raise ``Forbidden`` with the hook's reason if it rejects the publish."""
        if not self._on_publish_url:
            return
        body = {"action": "publish", "stream": stream, "subject": subject, "address": address,
                "kind": kind}
        try:
            async with self._client().post(self._on_publish_url, json=body) as response:
                if 200 <= response.status < 300:
                    return
                reason = await _reason(response)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.warning("on_publish webhook unreachable: %s", error, extra={"stream": stream})
            raise Unavailable("the publish webhook did not answer") from None
        raise Forbidden(f"rejected by on_publish: {reason}")

    def on_unpublish(self, stream: str, subject: str, address: str, kind: str,
                     reason: str) -> None:
        if not self._on_unpublish_url:
            return
        body = {"action": "unpublish", "stream": stream, "subject": subject, "address": address,
                "kind": kind, "reason": reason}
        task = asyncio.create_task(self._notify(self._on_unpublish_url, body))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _notify(self, url: str, body: dict[str, str]) -> None:
        try:
            async with self._client().post(url, json=body) as response:
                await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.warning("on_unpublish webhook failed: %s", error, extra={"stream": body["stream"]})

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=TIMEOUT_SECONDS)
        if self._session is not None:
            await self._session.close()


async def _reason(response: aiohttp.ClientResponse) -> str:
    text = (await response.text(errors="replace"))[:4096]
    try:
        message = json.loads(text).get("message")
        if isinstance(message, str):
            return message[:REASON_MAX_CHARS]
    except (ValueError, AttributeError):
        pass
    return (text.strip() or f"HTTP {response.status}")[:REASON_MAX_CHARS]
