"""Rollout analysis: the PromQL it asks (evaluated by promtool on real series), and how
answers from a Prometheus query endpoint are judged."""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from relay_operator import analysis, models

from tests.operator.local_prometheus import ScriptedPrometheus

NAMESPACE = "mail"
PODS = "relay-green-[a-z0-9]+-[a-z0-9]+"
NEW_POD = "relay-green-6d4f9c7b8-x2k9q"
OLD_POD = "relay-blue-5c8d7f6a9-p4m2z"


def spec(**extra: Any) -> models.Analysis:
    return models.Analysis.model_validate(
        {"prometheus": {"address": "http://127.0.0.1:9"}, **extra}
    )


def by_name(found: list[analysis.Check]) -> dict[str, analysis.Check]:
    return {check.name: check for check in found}


def all_checks() -> dict[str, analysis.Check]:
    return by_name(
        analysis.checks(spec(), namespace=NAMESPACE, pods=PODS, window="1m", error_rate_max=5)
    )


# ---------------------------------------------------------------------------------------
# The queries, evaluated by Prometheus's own engine (promtool test rules)
# ---------------------------------------------------------------------------------------


def series(metric: str, pod: str, values: str, **labels: str) -> dict[str, str]:
    shown = ",".join(
        f'{k}="{v}"' for k, v in {"namespace": NAMESPACE, "pod": pod, **labels}.items()
    )
    return {"series": f"{metric}{{{shown}}}", "values": values}


def promtool_eval(
    tmp_path: Path, inputs: list[dict[str, str]], cases: list[tuple[str, list[Any]]]
) -> subprocess.CompletedProcess[str]:
    """Evaluate each (query, expected samples) at 5m over `inputs` scraped every 15 s."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes from the Debian package prometheus (.ci/run installs it)"
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "15s",
                "input_series": inputs,
                "promql_expr_test": [
                    {"expr": query, "eval_time": "5m", "exp_samples": expected}
                    for query, expected in cases
                ],
            }
        ],
    }
    (tmp_path / "analysis_test.yaml").write_text(yaml.safe_dump(test, sort_keys=False))
    return subprocess.run(
        [promtool, "test", "rules", "analysis_test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def sample(value: float) -> dict[str, Any]:
    return {"labels": "{}", "value": value}


def test_queries_give_the_right_numbers_on_real_series(tmp_path: Path) -> None:
    # Over the last minute the new pod made 100 attempts per 15 s: 98 sent, 2 deferred;
    # the old pod failed everything and must not count. 4 SMTP replies in 100 were 4xx/5xx;
    # 1 hard bounce per 100 attempts, plus "delivered" reports that are not bounces.
    checks = all_checks()
    inputs = [
        series("emails_processed_total", NEW_POD, "0+98x40", outcome="sent", workspace="a"),
        series("emails_processed_total", NEW_POD, "0+2x40", outcome="deferred", workspace="a"),
        series("emails_processed_total", OLD_POD, "0+50x40", outcome="failed", workspace="a"),
        series("smtp_replies_total", NEW_POD, "0+96x40", **{"class": "2xx"}),
        series("smtp_replies_total", NEW_POD, "0+3x40", **{"class": "4xx"}),
        series("smtp_replies_total", NEW_POD, "0+1x40", **{"class": "5xx"}),
        series("bounces_total", NEW_POD, "0+1x40", type="hard", source="dsn"),
        series("bounces_total", NEW_POD, "0+50x40", type="delivered", source="mailgun"),
        series("provider_requests_total", NEW_POD, "0+75x40", provider="p", status="success"),
        series("provider_requests_total", NEW_POD, "0+25x40", provider="p", status="timeout"),
        series("email_queue_oldest_age_seconds", NEW_POD, "42x40"),
        series("email_queue_oldest_age_seconds", OLD_POD, "9000x40"),
    ]
    cases = [
        (checks["success-rate"].query, [sample(98)]),
        (checks["error-rate"].query, [sample(2)]),
        (checks["smtp-errors"].query, [sample(4)]),
        (checks["bounce-rate"].query, [sample(1)]),
        (checks["provider-failures"].query, [sample(25)]),
        (checks["queue-age"].query, [sample(42)]),
    ]
    result = promtool_eval(tmp_path, inputs, cases)
    assert result.returncode == 0, result.stdout + result.stderr


def test_latency_p95_comes_from_the_histogram_in_milliseconds(tmp_path: Path) -> None:
    # Every attempt took between 0.1 and 0.25 s: P95 interpolates to 242.5 ms.
    check = all_checks()["latency-p95"]
    metric = "email_processing_duration_seconds_bucket"
    inputs = [
        series(metric, NEW_POD, "0x40", le="0.1"),
        series(metric, NEW_POD, "0+100x40", le="0.25"),
        series(metric, NEW_POD, "0+100x40", le="+Inf"),
        series(metric, OLD_POD, "0+100x40", le="+Inf"),
    ]
    result = promtool_eval(tmp_path, inputs, [(check.query, [sample(242.5)])])
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_failures_counted_yet_reads_as_zero_not_as_missing(tmp_path: Path) -> None:
    # A healthy pod has no `deferred`, `4xx` or non-success series at all.
    checks = all_checks()
    inputs = [
        series("emails_processed_total", NEW_POD, "0+10x40", outcome="sent", workspace="a"),
        series("smtp_replies_total", NEW_POD, "0+10x40", **{"class": "2xx"}),
        series("provider_requests_total", NEW_POD, "0+10x40", provider="p", status="success"),
    ]
    cases = [
        (checks["error-rate"].query, [sample(0)]),
        (checks["smtp-errors"].query, [sample(0)]),
        (checks["provider-failures"].query, [sample(0)]),
        (checks["bounce-rate"].query, [sample(0)]),
    ]
    result = promtool_eval(tmp_path, inputs, cases)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_traffic_stays_empty_so_it_cannot_pass(tmp_path: Path) -> None:
    # The new pods exist but sent nothing: every ratio is empty, never 100% or 0%.
    checks = all_checks()
    inputs = [
        series("emails_processed_total", OLD_POD, "0+10x40", outcome="sent", workspace="a"),
    ]
    cases = [(checks[name].query, []) for name in ("success-rate", "error-rate", "smtp-errors")]
    result = promtool_eval(tmp_path, inputs, cases)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_version_that_never_succeeded_fails_rather_than_looking_empty(tmp_path: Path) -> None:
    check = all_checks()["success-rate"]
    inputs = [
        series("emails_processed_total", NEW_POD, "0+10x40", outcome="failed", workspace="a"),
    ]
    result = promtool_eval(tmp_path, inputs, [(check.query, [sample(0)])])
    assert result.returncode == 0, result.stdout + result.stderr


def test_selector_quotes_hostile_label_values() -> None:
    found = analysis.checks(spec(), namespace='a"b\\c', pods=PODS, window="30s")
    assert all('namespace="a\\"b\\\\c"' in check.query for check in found)
    assert all(check.query.startswith(f"# check: {check.name}\n") for check in found)


def test_disabled_checks_are_not_asked_and_error_rate_only_when_given() -> None:
    found = analysis.checks(
        spec(latency={"enabled": False}, queueAge={"enabled": False}),
        namespace=NAMESPACE,
        pods=PODS,
        window="1m",
    )
    names = [check.name for check in found]
    assert names == ["success-rate", "smtp-errors", "bounce-rate", "provider-failures"]


def test_window_must_be_a_duration() -> None:
    with pytest.raises(ValueError, match="window"):
        analysis.checks(spec(), namespace=NAMESPACE, pods=PODS, window="1m] or vector(1)")


# ---------------------------------------------------------------------------------------
# Judging answers
# ---------------------------------------------------------------------------------------


def test_judge_limits_nan_and_worst_series() -> None:
    checks = all_checks()
    success, latency = checks["success-rate"], checks["latency-p95"]
    assert analysis.judge(success, [99.5]).outcome == "Pass"
    failed = analysis.judge(success, [97.0])
    assert failed.outcome == "Fail" and "97.00% < min 99%" in failed.message
    assert analysis.judge(success, []).outcome == "Inconclusive"
    assert analysis.judge(success, [math.nan]).outcome == "Inconclusive"
    assert analysis.judge(latency, [math.inf]).outcome == "Inconclusive"
    worst = analysis.judge(latency, [100.0, 900.0, 200.0])
    assert worst.outcome == "Fail" and worst.value == 900.0 and "worst of 3" in worst.message


def test_verdict_folds_outcomes() -> None:
    def of(*kinds: analysis.Verdict) -> analysis.Verdict:
        return analysis.verdict(
            [analysis.Outcome(str(i), k, None, "") for i, k in enumerate(kinds)]
        )

    assert of("Pass", "Pass") == "Pass"
    assert of("Pass", "Inconclusive") == "Inconclusive"
    assert of("Inconclusive", "Fail") == "Fail"
    assert of() == "Inconclusive"


def run_against(prometheus: ScriptedPrometheus, **extra: Any) -> dict[str, analysis.Outcome]:
    settings = models.Prometheus.model_validate({"address": prometheus.address, **extra})
    checks = analysis.checks(spec(), namespace=NAMESPACE, pods=PODS, window="1m", error_rate_max=5)
    outcomes = asyncio.run(analysis.run(settings, checks))
    return {outcome.name: outcome for outcome in outcomes}


def test_run_against_a_query_endpoint_good_bad_empty_nan_error() -> None:
    with ScriptedPrometheus() as prometheus:
        prometheus.set(default="good")
        good = run_against(prometheus)
        assert {o.outcome for o in good.values()} == {"Pass"}, good
        assert len(good) == 7
        assert len(prometheus.queries) == 7

        prometheus.set(default="good", latency_p95="bad", queue_age="empty")
        mixed = run_against(prometheus)
        assert mixed["latency-p95"].outcome == "Fail"
        assert mixed["latency-p95"].value == 2400
        assert mixed["queue-age"].outcome == "Inconclusive"
        assert "no data" in mixed["queue-age"].message
        assert mixed["success-rate"].outcome == "Pass"

        prometheus.set(default="nan")
        assert {o.outcome for o in run_against(prometheus).values()} == {"Inconclusive"}

        prometheus.set(default="error")
        errors = run_against(prometheus)
        assert {o.outcome for o in errors.values()} == {"Inconclusive"}
        assert "Prometheus error (bad_data)" in errors["success-rate"].message


def test_unreachable_prometheus_is_inconclusive_not_an_exception() -> None:
    with ScriptedPrometheus() as prometheus:
        address = prometheus.address
    settings = models.Prometheus.model_validate({"address": address, "timeout": "2s"})
    outcomes = asyncio.run(analysis.run(settings, list(all_checks().values())))
    assert {o.outcome for o in outcomes} == {"Inconclusive"}
    assert all("unreachable" in o.message for o in outcomes), outcomes


def test_status_form_has_no_value_when_there_is_none() -> None:
    outcome = analysis.Outcome("queue-age", "Inconclusive", None, "no data")
    assert outcome.as_status() == {
        "name": "queue-age",
        "outcome": "Inconclusive",
        "message": "no data",
    }
    models.CheckResult.model_validate(outcome.as_status())


def test_credentials_in_the_address_never_reach_the_log(caplog: pytest.LogCaptureFixture) -> None:
    from relay_operator.cli import quiet_libraries

    quiet_libraries()
    caplog.set_level(logging.DEBUG)
    with ScriptedPrometheus() as prometheus:
        address = prometheus.address.replace("http://", "http://reader:PROM-SECRET-88@")
        settings = models.Prometheus.model_validate({"address": address})
        checks = list(all_checks().values())[:1]
        outcomes = asyncio.run(analysis.run(settings, checks))
    assert outcomes[0].outcome == "Pass"  # the request was made
    assert caplog.records, "nothing was logged at all: the test would prove nothing"
    assert "SECRET" not in caplog.text
