"""Queue ids: sortable by time so the primary key index grows at its end (cheap InnoDB inserts).

The layout is ULID's: 48 bits of milliseconds since the epoch, then 80 random bits, written in
Crockford's base32 as 26 characters.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_queue_id(now_ms: int | None = None) -> str:
    millis = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))
