"""Rollout analysis: the relay's mail metrics, asked of Prometheus, judged against limits.

`checks()` turns `spec.strategy.analysis` into PromQL queries that look only at the new
version's pods over the last window; `run()` asks Prometheus all of them at once and
judges each value; `verdict()` folds the outcomes into the one answer a rollout step needs.

A check that cannot be judged (no traffic yet, Prometheus down, a malformed answer) is
Inconclusive, never a pass: a version that sent no mail has proved nothing. So every
ratio keeps an empty or zero denominator empty or NaN, while a numerator whose series may
not exist yet (no failure ever counted) reads as 0 - otherwise a healthy version would
look inconclusive forever, and a version that never once succeeded would too.

Each query starts with a PromQL comment line, `# check: <name>`, so that a Prometheus
query log (and the tests' scripted Prometheus) can tell the checks apart.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from relay_operator import models
from relay_operator.peers import reason, short

# The pure state machine owns the outcome type; this module only produces outcomes.
from relay_operator.rollout import CheckOutcome as Outcome
from relay_operator.rollout import Verdict, duration_s

# ---------------------------------------------------------------------------------------
# Checks: what is asked
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One query and the range its value must fall in."""

    name: str
    query: str
    min: float | None  # pass when value >= min
    max: float | None  # pass when value <= max
    unit: str  # "%", "ms" or "s", for messages


def promql_string(value: str) -> str:
    """`value` as a double-quoted PromQL string literal.

    PromQL reads string escapes as Go does; JSON's escapes (\\", \\\\, \\n, \\uXXXX) are a
    subset of those, so a JSON string is a correct PromQL literal for any value.
    """
    return json.dumps(value, ensure_ascii=False)


def _ratio(
    *, name: str, part: str, whole: str, limit: float | None = None, floor: float | None = None
) -> Check:
    # `or vector(0)`: a series that was never incremented does not exist, and that means
    # zero (no failure counted yet; or, for success-rate, a version that never once
    # succeeded, which must fail rather than look inconclusive). The denominator gets no
    # such default, so no traffic stays empty (or 0/0 = NaN).
    query = f"# check: {name}\n100 * (sum({part}) or vector(0)) / sum({whole})"
    return Check(name=name, query=query, min=floor, max=limit, unit="%")


def checks(
    analysis: models.Analysis,
    *,
    namespace: str,
    pods: str,
    window: str,
    error_rate_max: float | None = None,
) -> list[Check]:
    """The enabled checks of `analysis` for the pods whose names match the regex `pods`.

    `window` is the PromQL range each rate is taken over (the spec's Duration spelling,
    which PromQL accepts). `error_rate_max` adds blue-green's error-rate check.
    """
    try:
        duration_s(window)
    except ValueError:
        raise ValueError(f"window must be a duration like 1m or 30s, not {window!r}") from None
    selector = f"namespace={promql_string(namespace)},pod=~{promql_string(pods)}"

    def rate(metric: str, extra: str = "") -> str:
        labels = f"{selector},{extra}" if extra else selector
        return f"rate({metric}{{{labels}}}[{window}])"

    found: list[Check] = []
    if analysis.success_rate.enabled:
        found.append(
            _ratio(
                name="success-rate",
                part=rate("emails_processed_total", 'outcome="sent"'),
                whole=rate("emails_processed_total"),
                floor=analysis.success_rate.min,
            )
        )
    if error_rate_max is not None:
        found.append(
            _ratio(
                name="error-rate",
                part=rate("emails_processed_total", 'outcome!="sent"'),
                whole=rate("emails_processed_total"),
                limit=error_rate_max,
            )
        )
    if analysis.latency.enabled:
        buckets = rate("email_processing_duration_seconds_bucket")
        query = f"# check: latency-p95\n1000 * histogram_quantile(0.95, sum by (le) ({buckets}))"
        found.append(Check("latency-p95", query, None, analysis.latency.p95_max_ms, "ms"))
    ratios = (
        ("smtp-errors", analysis.smtp_errors, "smtp_replies_total", 'class=~"4xx|5xx"', ""),
        # bounces_total also counts "delivered" reports; only hard, soft and complaint are
        # bounces. Its denominator is the pods' delivery attempts.
        (
            "bounce-rate",
            analysis.bounce_rate,
            "bounces_total",
            'type!="delivered"',
            "emails_processed_total",
        ),
        (
            "provider-failures",
            analysis.provider_failures,
            "provider_requests_total",
            'status!="success"',
            "",
        ),
    )
    for name, setting, metric, condition, denominator in ratios:
        if setting.enabled:
            found.append(
                _ratio(
                    name=name,
                    part=rate(metric, condition),
                    whole=rate(denominator or metric),
                    limit=setting.max_percent,
                )
            )
    if analysis.queue_age.enabled:
        query = f"# check: queue-age\nmax(email_queue_oldest_age_seconds{{{selector}}})"
        found.append(Check("queue-age", query, None, analysis.queue_age.max_seconds, "s"))
    return found


# ---------------------------------------------------------------------------------------
# Outcomes: what came back
# ---------------------------------------------------------------------------------------


def verdict(outcomes: Sequence[Outcome]) -> Verdict:
    """Any Fail fails; otherwise any Inconclusive (or no checks at all) is inconclusive."""
    kinds = {outcome.outcome for outcome in outcomes}
    if "Fail" in kinds:
        return "Fail"
    if "Inconclusive" in kinds or not outcomes:
        return "Inconclusive"
    return "Pass"


class _Unusable(Exception):
    """Prometheus gave no value that can be judged; the message says why."""


def _show(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.2f}%"
    return f"{value:.0f} {unit}" if abs(value) >= 10 else f"{value:.2f} {unit}"


def _limit(value: float, unit: str) -> str:
    shown = f"{value:g}"
    return f"{shown}%" if unit == "%" else f"{shown} {unit}"


def _excess(value: float, check: Check) -> float:
    """How far `value` lies past the check's limits (negative: inside them)."""
    below = check.min - value if check.min is not None else -math.inf
    above = value - check.max if check.max is not None else -math.inf
    return max(below, above)


def judge(check: Check, values: Sequence[float]) -> Outcome:
    """Judge the values one query returned (several series: the worst one counts)."""
    if not values:
        return Outcome(check.name, "Inconclusive", None, "no data (no traffic or not scraped yet)")
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        shown = "NaN" if math.isnan(values[0]) else ("+Inf" if values[0] > 0 else "-Inf")
        message = f"value {shown} (no traffic in the window to judge)"
        return Outcome(check.name, "Inconclusive", None, message)
    value = max(finite, key=lambda found: _excess(found, check))
    many = f" (worst of {len(values)} series)" if len(values) > 1 else ""
    if check.min is not None and value < check.min:
        text = f"{check.name} {_show(value, check.unit)} < min {_limit(check.min, check.unit)}"
        return Outcome(check.name, "Fail", value, text + many)
    if check.max is not None and value > check.max:
        text = f"{check.name} {_show(value, check.unit)} > max {_limit(check.max, check.unit)}"
        return Outcome(check.name, "Fail", value, text + many)
    bounds = [f">= min {_limit(check.min, check.unit)}"] if check.min is not None else []
    if check.max is not None:
        bounds.append(f"<= max {_limit(check.max, check.unit)}")
    text = f"{check.name} {_show(value, check.unit)} " + " and ".join(bounds)
    return Outcome(check.name, "Pass", value, text.rstrip() + many)


# ---------------------------------------------------------------------------------------
# Asking Prometheus
# ---------------------------------------------------------------------------------------


def _sample_value(sample: Any) -> float:
    # A sample is [<unix time>, "<value as a string>"]; the string may be NaN or +Inf.
    if not isinstance(sample, list) or len(sample) != 2 or not isinstance(sample[1], str):
        raise _Unusable(f"malformed sample in the answer: {short(json.dumps(sample))}")
    try:
        return float(sample[1])
    except ValueError:
        raise _Unusable(f"sample value is not a number: {short(sample[1])}") from None


def values_of(body: Any) -> list[float]:
    """The values in a successful /api/v1/query answer (vector or scalar)."""
    if not isinstance(body, dict):
        raise _Unusable("answer is not a JSON object")
    if body.get("status") == "error":
        kind, error = body.get("errorType", "error"), body.get("error", "")
        raise _Unusable(f"Prometheus error ({kind}): {short(str(error))}")
    data = body.get("data")
    if body.get("status") != "success" or not isinstance(data, dict):
        raise _Unusable("answer is neither success nor error")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return [_sample_value(result)]
    if kind != "vector" or not isinstance(result, list):
        raise _Unusable(f"expected an instant vector, got resultType {short(str(kind))}")
    values = []
    for series in result:
        if not isinstance(series, dict):
            raise _Unusable("malformed series in the answer")
        values.append(_sample_value(series.get("value")))
    return values


def _decode(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    # Prometheus sends its JSON error body with 400, 422 and 503; that says more than
    # the status code does.
    if isinstance(body, dict) and body.get("status") == "error":
        return body
    if not response.is_success:
        detail = short(response.text) if response.text.strip() else response.reason_phrase
        raise _Unusable(f"Prometheus answered HTTP {response.status_code}: {detail}")
    if body is None:
        raise _Unusable(f"answer is not JSON: {short(response.text) or '(empty)'}")
    return body


@dataclass(frozen=True)
class _Endpoint:
    url: str
    timeout: str  # the spec's spelling, which Prometheus's own timeout parameter reads
    seconds: float


async def _query(client: httpx.AsyncClient, endpoint: _Endpoint, check: Check) -> list[float]:
    # Prometheus's own timeout stops the evaluation too; ours bounds the whole exchange,
    # however slowly an answer trickles in.
    params = {"query": check.query, "timeout": endpoint.timeout}
    async with asyncio.timeout(endpoint.seconds):
        response = await client.get(endpoint.url, params=params)
    return values_of(_decode(response))


async def _run_one(client: httpx.AsyncClient, endpoint: _Endpoint, check: Check) -> Outcome:
    try:
        values = await _query(client, endpoint, check)
    except _Unusable as exc:
        return Outcome(check.name, "Inconclusive", None, str(exc))
    except (TimeoutError, httpx.TimeoutException):
        message = f"Prometheus did not answer within {endpoint.timeout}"
        return Outcome(check.name, "Inconclusive", None, message)
    except (httpx.TransportError, OSError) as exc:
        return Outcome(check.name, "Inconclusive", None, f"Prometheus unreachable: {reason(exc)}")
    except Exception as exc:
        # Whatever else goes wrong talking to Prometheus (a bad URL, an odd answer), the
        # rollout must get an outcome, not an exception: it pauses on Inconclusive.
        message = f"Prometheus query failed: {type(exc).__name__}: {reason(exc)}"
        return Outcome(check.name, "Inconclusive", None, message)
    return judge(check, values)


async def run(
    prometheus: models.Prometheus,
    checks: Sequence[Check],
    *,
    client: httpx.AsyncClient | None = None,
) -> list[Outcome]:
    """Ask Prometheus every check at once; one Outcome per check, in order. Never raises
    for a Prometheus problem: those are Inconclusive outcomes."""
    seconds = duration_s(prometheus.timeout)
    endpoint = _Endpoint(
        url=prometheus.address.rstrip("/") + "/api/v1/query",
        timeout=prometheus.timeout,
        seconds=seconds,
    )
    session = client or httpx.AsyncClient(timeout=seconds, follow_redirects=False)
    try:
        found = await asyncio.gather(*(_run_one(session, endpoint, check) for check in checks))
    finally:
        if client is None:
            await session.aclose()
    return list(found)
