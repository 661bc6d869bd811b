"""Time as the queue sees it: naive datetimes in UTC, to the microsecond.

Naive because both SQLite and MySQL DATETIME columns are zone-less; UTC always, so replicas
in different zones agree.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
