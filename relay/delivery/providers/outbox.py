"""The outbox provider: each delivered message becomes an .eml file in a directory.

It is the embedded default, so the relay runs with no credentials at all, and a real sink
for tests and demos. Files appear atomically: bytes are written and fsynced under a
temporary name, then renamed, so a reader never sees half a message. Beside each
`<queue id>.eml` a `<queue id>.json` records the envelope, which the .eml cannot carry.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path

from relay.delivery.providers.base import Envelope, Outcome, ProviderError, RecipientResult


class OutboxProvider:
    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.directory = directory

    async def send(self, envelope: Envelope, content: bytes) -> Sequence[RecipientResult]:
        try:
            stem = await asyncio.to_thread(self._write, envelope, content)
        except OSError as exc:
            raise ProviderError(f"outbox write failed: {exc.strerror}") from exc
        return [
            RecipientResult(address, Outcome.DELIVERED, "written to outbox", stem)
            for address in envelope.rcpt_tos
        ]

    def _write(self, envelope: Envelope, content: bytes) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = envelope.message_id
        # A retry that delivers the remaining recipients of a message writes a second file.
        attempt = 1
        while (self.directory / f"{stem}.eml").exists():
            attempt += 1
            stem = f"{envelope.message_id}.{attempt}"
        meta = {
            "queue_id": envelope.message_id,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
        }
        _write_atomically(self.directory / f"{stem}.json", json.dumps(meta).encode())
        _write_atomically(self.directory / f"{stem}.eml", content)
        return stem

    async def check(self) -> None:
        target = self.directory if self.directory.exists() else self.directory.parent
        if not os.access(target, os.W_OK):
            raise ProviderError(f"outbox directory {self.directory} is not writable")

    async def close(self) -> None:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
