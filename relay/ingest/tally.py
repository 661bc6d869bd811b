"""Open SMTP sessions counted across the processes of one relay (`smtp.processes`).

`smtp.max_connections` and `smtp.max_connections_per_ip` are limits on the relay, not on
each of its processes, and connections do not spread evenly over processes that accept
from one socket. So the processes keep one count, in a small file they all map: a row per
client address (by a hash of it) with a column per process, and a row of totals. Every
change happens under an exclusive lock on the file (each process opens it itself, so the
locks exclude each other). A column per process lets the first process wipe the sessions
of an extra one that died without closing them, before it starts the next one.

Rows are never removed one by one, so probe chains stay intact; when no row is free,
rows without sessions are dropped and the rest placed again. If every row holds a live
client (more distinct addresses than rows), a new address is let in without being
counted: the limits are there to share the relay, not to refuse mail.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

ROWS = 4096
_CELL = 8  # bytes: each cell is a signed 64-bit integer

TOO_MANY = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_YOU = "421 4.7.0 Too many connections from your address, try again later"


def _size(processes: int) -> int:
    return (ROWS + 1) * (processes + 1) * _CELL


def create(path: Path, processes: int) -> None:
    """An empty tally for `processes` processes (the first process, before the others)."""
    path.write_bytes(bytes(_size(processes)))


def _key(address: str) -> int:
    digest = hashlib.blake2b(address.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1  # 0 marks a free row


class SessionTally:
    """One process's handle on the shared count; `index` is its column (first: 0)."""

    def __init__(self, path: Path, processes: int, index: int) -> None:
        self.path = path
        self.processes = processes
        self.index = index
        self._width = processes + 1
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, _size(processes))
        self._cells = memoryview(self._map).cast("q")

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        os.close(self._fd)

    def admit(self, address: str, max_total: int, max_per_address: int) -> tuple[str | None, bool]:
        """(refusal, counted): a 421 to send, or None; whether release() must follow."""
        with self._locked():
            if self._sum(0) >= max_total:
                return TOO_MANY, False
            row = self._row(_key(address))
            if row is None:
                return None, False
            if self._sum(row) >= max_per_address:
                return TOO_MANY_FROM_YOU, False
            self._add(row, 1)
            self._add(0, 1)
            return None, True

    def release(self, address: str) -> None:
        with self._locked():
            row = self._row(_key(address), add=False)
            if row is not None and self._cells[row * self._width + 1 + self.index] > 0:
                self._add(row, -1)
                self._add(0, -1)

    def forget(self, index: int) -> None:
        """Drop every session of process `index` (it exited without closing them)."""
        with self._locked():
            for row in range(ROWS + 1):
                self._cells[row * self._width + 1 + index] = 0

    def sessions(self, address: str | None = None) -> int:
        with self._locked():
            if address is None:
                return self._sum(0)
            row = self._row(_key(address), add=False)
            return 0 if row is None else self._sum(row)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sum(self, row: int) -> int:
        start = row * self._width + 1
        return sum(self._cells[start : start + self.processes])

    def _add(self, row: int, change: int) -> None:
        self._cells[row * self._width + 1 + self.index] += change

    def _row(self, key: int, *, add: bool = True) -> int | None:
        for attempt in range(2):
            start = key % ROWS
            for step in range(ROWS):
                row = 1 + (start + step) % ROWS
                found = self._cells[row * self._width]
                if found == key:
                    return row
                if found == 0:
                    if not add:
                        return None
                    self._cells[row * self._width] = key
                    return row
            if not add or attempt:
                return None
            self._compact()
        return None

    def _compact(self) -> None:
        live = []
        for row in range(1, ROWS + 1):
            start = row * self._width
            counts = list(self._cells[start + 1 : start + self._width])
            if any(counts):
                live.append((self._cells[start], counts))
            self._cells[start : start + self._width] = memoryview(bytes(self._width * _CELL)).cast(
                "q"
            )
        for key, counts in live:
            placed = self._row(key)
            assert placed is not None
            start = placed * self._width
            self._cells[start + 1 : start + self._width] = memoryview(
                b"".join(c.to_bytes(_CELL, "little", signed=True) for c in counts)
            ).cast("q")
