"""JSON log lines: one object per line, with the context fields a record carries (stream, session,
request ids). Tokens never reach a log: callers log stream names and subjects, not credentials."""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import sys
import time
from contextvars import ContextVar

_CONTEXT_FIELDS = ("stream", "session", "request_id", "rendition", "peer", "url")

# The HTTP request being handled, set by the app's middleware: every line logged while handling it
# carries its id (the client's X-Request-Id, or one made up), and so does the response.
request_id: ContextVar[str | None] = ContextVar("livedge_request_id", default=None)

_TAME_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a client's id is echoed only when this tame
# New ids: a random prefix per process and a counter, unique without a system call per request.
_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count()


def request_id_for(incoming: str | None) -> str:
    """The id of a request: the client's ``X-Request-Id`` when it is tame, else a new one."""
    if incoming and _TAME_REQUEST_ID.fullmatch(incoming):
        return incoming
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFF:08x}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is None and field == "request_id":
                value = request_id.get()
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would write a line per part request: far too much at LL-HLS rates.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiohttp logs each malformed request (a scanner, a fuzzer) as an ERROR with a traceback: a
    # client can flood the log with them. Handler errors are logged by our own middleware.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
