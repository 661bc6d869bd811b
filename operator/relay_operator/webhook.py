"""The confirm-promotion gate: ask an HTTP endpoint before traffic moves for good.

`spec.strategy.confirmPromotionWebhook` names a URL; before the blue-green switch (or the
canary's promotion) the operator POSTs a JSON description of the rollout to it. A 2xx
answer confirms. Anything else holds the step: a 409 from a change-freeze service, a 500
from a broken one, a redirect (never followed: the rollout description would go wherever
it points, and an approval endpoint that moved should be re-configured, not guessed at),
no answer in time, no connection. The rollout asks again later, so a refusal is an
answer, never an exception.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import httpx

from relay_operator import __version__, models
from relay_operator.peers import reason, short
from relay_operator.rollout import duration_s


def _refusal(response: httpx.Response) -> str:
    message = f"answered HTTP {response.status_code}"
    if response.is_redirect:
        message += " (redirects are not followed)"
    detail = short(response.text)
    return f"{message}: {detail}" if detail else message


async def _post(webhook: models.Webhook, body: bytes, seconds: float) -> httpx.Response:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"smtp-relay-operator/{__version__}",
    }
    async with httpx.AsyncClient(timeout=seconds, follow_redirects=False) as client:
        # httpx's timeout is per read or write; this one bounds the whole exchange.
        async with asyncio.timeout(seconds):
            return await client.post(webhook.url, content=body, headers=headers)


async def confirm(webhook: models.Webhook, payload: Mapping[str, Any]) -> tuple[bool, str]:
    """POST `payload` as JSON; (True, why) on a 2xx answer, else (False, why). Never raises."""
    try:
        body = json.dumps(dict(payload), separators=(",", ":")).encode("utf-8")
        seconds = duration_s(webhook.timeout)
    except (TypeError, ValueError) as exc:
        return False, f"cannot build the request: {short(str(exc))}"
    try:
        response = await _post(webhook, body, seconds)
    except (TimeoutError, httpx.TimeoutException):
        return False, f"no answer within {webhook.timeout}"
    except (httpx.TransportError, OSError) as exc:
        return False, f"unreachable: {reason(exc)}"
    except Exception as exc:
        # A URL httpx refuses, or anything odd on the way: the step stays held either way.
        return False, f"request failed: {type(exc).__name__}: {reason(exc)}"
    if response.is_success:
        return True, f"confirmed (HTTP {response.status_code})"
    return False, _refusal(response)
