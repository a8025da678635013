"""Structured logging: one JSON object per line on stderr."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


# Whatever follows "Authorization:" or "Bearer" is a secret, in any message or traceback (a
# library may quote a raw header line). Stops at quotes and line ends, JSON-escaped or not.
_AUTH_VALUE = re.compile(r"(?i)(authorization\s*[\"']?\s*[:=,]\s*[\"']?)[^\"'\r\n\\]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"'\\]+")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields become keys (cold-start breakdowns).

    Lines are scrubbed of Authorization values and of every configured token, so that no
    code path (ours or a library's) can put a secret in the log.
    """

    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets or [] if s}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        line = self._format(record)
        line = _BEARER.sub(r"\1[redacted]", _AUTH_VALUE.sub(r"\1[redacted]", line))
        for secret in self.secrets:
            line = line.replace(secret, "[redacted]")
        return line

    def _format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": round(record.created, 6), "level": record.levelname,
                               "logger": record.name, "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _RECORD_ATTRS and not k.startswith("_"):
                doc[k] = v
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str = "INFO", secrets: list[str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
