"""The confirm-promotion webhook gate against a local HTTP endpoint."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from relay_operator import models, webhook

from tests.local_http import LocalApi, Reply, closed_port_url, start_api

PAYLOAD = {"kind": "SmtpRelay", "name": "relay", "candidateRevision": "abc123"}


@pytest.fixture
def endpoint() -> Iterator[LocalApi]:
    api = start_api()
    yield api
    api.stop()
    assert not api.errors


def hook(url: str, timeout: str = "2s") -> models.Webhook:
    return models.Webhook.model_validate({"url": url, "timeout": timeout})


def test_2xx_confirms_and_the_rollout_is_described_as_json(endpoint: LocalApi) -> None:
    endpoint.route("POST", "/confirm", lambda request: Reply(204))
    ok, why = asyncio.run(webhook.confirm(hook(endpoint.url + "/confirm"), PAYLOAD))
    assert ok and why == "confirmed (HTTP 204)"
    request = endpoint.requests[0]
    assert request.method == "POST" and request.path == "/confirm"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == PAYLOAD


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            Reply(409, body=b"change freeze until Monday"),
            "answered HTTP 409: change freeze until Monday",
        ),
        (Reply(500), "answered HTTP 500"),
        (
            Reply(302, headers={"Location": "http://127.0.0.1:9/elsewhere"}),
            "answered HTTP 302 (redirects are not followed)",
        ),
    ],
)
def test_anything_but_2xx_holds_the_step(endpoint: LocalApi, reply: Reply, expected: str) -> None:
    endpoint.route("POST", "/confirm", lambda request: reply)
    ok, why = asyncio.run(webhook.confirm(hook(endpoint.url + "/confirm"), PAYLOAD))
    assert not ok
    assert why == expected
    assert len(endpoint.requests) == 1  # the redirect was not followed


def test_unreachable_holds_the_step_without_raising() -> None:
    ok, why = asyncio.run(webhook.confirm(hook(closed_port_url()), PAYLOAD))
    assert not ok and why == "unreachable: connection refused"


def test_slow_answer_holds_the_step(endpoint: LocalApi) -> None:
    def slow(request: object) -> Reply:
        time.sleep(2.5)
        return Reply(200)

    endpoint.route("POST", "/confirm", slow)
    ok, why = asyncio.run(webhook.confirm(hook(endpoint.url + "/confirm", "1s"), PAYLOAD))
    assert not ok and why == "no answer within 1s"
