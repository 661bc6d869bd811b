"""Logs are events: one line each, with ids and an outcome; JSON in production.

Message bodies and credentials are never passed to a logger. Recipient addresses are only
logged hashed (`hash_address`), since for healthcare mail an address is health data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# uvicorn adds `color_message` (the event with terminal colour codes) to its records.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _RESERVED and not key.startswith("_")
        )
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        return f"{stamp} {record.levelname:<7} {record.getMessage()} {fields}".rstrip()


def configure(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command line, addresses included, at INFO: keep it to warnings.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # httpx logs each provider request's URL at INFO: per message, and a URL is not ours
    # to vouch for (a configured base URL may carry credentials).
    for noisy in ("uvicorn.access", "aiosqlite", "asyncio", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields (never a body, never a secret)."""
    logger.log(level, name, extra=fields)


def hash_address(address: str) -> str:
    """A stable, non-reversible stand-in for an address in logs."""
    return hashlib.sha256(address.lower().encode("utf-8", "surrogateescape")).hexdigest()[:16]
