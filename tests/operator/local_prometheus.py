"""An HTTP server on 127.0.0.1 that speaks Prometheus's instant-query API with scripted answers.

It follows the documented contract of `GET|POST /api/v1/query` (query and timeout as URL or
form parameters; a JSON body with status, data.resultType and data.result, or status
"error" with errorType and error and HTTP 400). Which answer a query gets is up to the
test: every analysis query starts with a `# check: <name>` comment line, and the test sets
a mode per check name (with dashes written as underscores) or a default for all of them:

- "good": a value well inside the check's limits
- "bad": a value well outside them
- "empty": an empty vector (no series: no traffic yet)
- "nan": one series whose value is NaN (0/0: a rate over no requests)
- "error": HTTP 400 with Prometheus's error body

`queries` keeps every query received, in order, for assertions about what was asked.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

from tests.local_http import LocalApi, Reply, Request

MODES = ("good", "bad", "empty", "nan", "error")

# Per check: (good value, bad value), in the unit the check's query yields.
VALUES = {
    "success-rate": ("100", "42.5"),
    "error-rate": ("0", "37.5"),
    "latency-p95": ("120", "2400"),
    "smtp-errors": ("0.5", "35"),
    "bounce-rate": ("0", "25"),
    "provider-failures": ("1", "60"),
    "queue-age": ("3", "3600"),
}


def check_name(query: str) -> str | None:
    first = query.lstrip().split("\n", 1)[0].strip()
    if first.startswith("# check:"):
        return first.removeprefix("# check:").strip()
    return None


class ScriptedPrometheus:
    """Use as a context manager; `address` is the base URL to configure."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._default = "good"
        self._modes: dict[str, str] = {}
        self.queries: list[str] = []
        self._api = LocalApi()
        for method in ("GET", "POST"):
            self._api.route(method, "/api/v1/query", self._answer)
        self.address = self._api.url

    def __enter__(self) -> ScriptedPrometheus:
        self._api.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._api.stop()
        assert not self._api.errors, self._api.errors

    def set(self, default: str | None = None, **per_check: str) -> None:
        """Script the answers: `set(default="good", latency_p95="bad")`. Replaces the
        per-check modes given before."""
        for mode in [default, *per_check.values()]:
            if mode is not None and mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        unknown = {name.replace("_", "-") for name in per_check} - set(VALUES)
        if unknown:
            raise ValueError(f"unknown checks {sorted(unknown)}; known: {sorted(VALUES)}")
        with self._lock:
            if default is not None:
                self._default = default
            self._modes = {name.replace("_", "-"): mode for name, mode in per_check.items()}

    def mode_for(self, name: str | None) -> str:
        with self._lock:
            return self._modes.get(name or "", self._default)

    def _answer(self, request: Request) -> Reply:
        # Prometheus takes its parameters from the URL or, for POST, a form body.
        params = dict(request.query)
        if request.method == "POST" and request.body:
            params.update(request.form())
        query = (params.get("query") or [""])[0]
        with self._lock:
            self.queries.append(query)
        if not query.strip():
            error = {"status": "error", "errorType": "bad_data", "error": "query is empty"}
            return Reply(400, json=error)
        name = check_name(query)
        mode = self.mode_for(name)
        if mode == "error":
            error = {
                "status": "error",
                "errorType": "bad_data",
                "error": "1:1: parse error: scripted failure",
            }
            return Reply(400, json=error)
        now = round(time.time(), 3)
        result: list[dict[str, Any]] = []
        if mode == "nan":
            result = [{"metric": {}, "value": [now, "NaN"]}]
        elif mode in ("good", "bad"):
            good, bad = VALUES.get(name or "", ("0", "100"))
            result = [{"metric": {}, "value": [now, good if mode == "good" else bad]}]
        return Reply(
            200, json={"status": "success", "data": {"resultType": "vector", "result": result}}
        )
