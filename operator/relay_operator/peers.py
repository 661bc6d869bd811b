"""How the operator words what went wrong talking to a peer (Prometheus, a webhook, a relay).

Those words end up in status and Events, so they are one readable line, and they name the
root cause: httpx wraps a refused connection three layers deep under "All connection
attempts failed", which tells an on-call engineer nothing.
"""

from __future__ import annotations

# A status message or Event keeps to a readable line.
DETAIL_CHARS = 200


def short(text: str) -> str:
    """`text` on one line, cut to DETAIL_CHARS."""
    line = " ".join(text.split())
    return line if len(line) <= DETAIL_CHARS else line[: DETAIL_CHARS - 3] + "..."


def reason(exc: BaseException) -> str:
    """The most telling cause in `exc`'s chain, as a short phrase."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        cause = cause.__cause__ or cause.__context__
    return short(str(exc)) or type(exc).__name__
