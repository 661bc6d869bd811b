"""The rollout state machine, driven through whole rollouts without a cluster.

`World` plays the cluster: it keeps both colour Deployments, makes their pods available
when told, and feeds plan() back its own output, as the operator does on each reconcile.
Every step asserts what a person would check: where the Service points, how many pods
each colour runs, the phase and the Events.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import pytest
from relay_operator import rollout
from relay_operator.models import RolloutStatus, Strategy
from relay_operator.rollout import CheckOutcome, ColourState, Controls, Observed, Plan, Target

START = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.UTC)
V1 = Target("rev1", "relay:1", "cfg1")
V2 = Target("rev2", "relay:2", "cfg2")
V3 = Target("rev3", "relay:3", "cfg3")


def good() -> list[CheckOutcome]:
    return [CheckOutcome("success-rate", "Pass", 100.0, "success-rate 100% >= 99%")]


def bad() -> list[CheckOutcome]:
    return [CheckOutcome("success-rate", "Fail", 50.0, "success-rate 50% < 99%")]


def empty() -> list[CheckOutcome]:
    return [CheckOutcome("success-rate", "Inconclusive", None, "no data")]


@dataclass
class World:
    strategy: Strategy
    replicas: int = 4
    target: Target = V1
    now: datetime.datetime = START
    state: RolloutStatus | None = None
    colours: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {c: {"revision": None, "replicas": 0, "ready": 0} for c in "bg"}
    )
    controls: Controls = field(default_factory=Controls)
    smoke: tuple[bool, str] = (True, "greeting, EHLO, NOOP, QUIT and /health fine")
    analysis: list[CheckOutcome] = field(default_factory=good)
    confirmation: tuple[bool, str] = (True, "confirmed (HTTP 200)")
    legacy: bool = False
    instant: bool = True  # pods are available as soon as they are asked for
    events: list[tuple[str, str]] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    last: Plan | None = None

    def observed(self, **answers: Any) -> Observed:
        states = {
            name: ColourState(
                exists=c["revision"] is not None,
                revision=c["revision"],
                replicas=c["replicas"],
                available=c["ready"],
                settled=True,
            )
            for name, c in (("blue", self.colours["b"]), ("green", self.colours["g"]))
        }
        return Observed(
            now=self.now,
            target=self.target,
            replicas=self.replicas,
            colours=states,  # type: ignore[arg-type]
            controls=self.controls,
            legacy=self.legacy,
            **answers,
        )

    def step(self) -> Plan:
        """One reconcile: plan, answer what it asks, apply the children."""
        result = rollout.plan(self.strategy, self.state, self.observed())
        answers: dict[str, Any] = {}
        while result.need is not None:
            self.asked.append(result.need)
            answers[result.need] = {
                "smoke": self.smoke,
                "analysis": self.analysis,
                "confirmation": self.confirmation,
            }[result.need]
            result = rollout.plan(self.strategy, self.state, self.observed(**answers))
        self.state = result.state
        # As the operator writes it (a serializer warning is an error under pytest here).
        rollout.parse_state(rollout.dump_state(result.state))
        for colour, work in result.workloads.items():
            c = self.colours[colour[0]]
            if work.revision is not None and work.revision != c["revision"]:
                c["revision"], c["ready"] = work.revision, 0
            c["replicas"] = work.replicas
            if self.instant:
                c["ready"] = work.replicas
            else:
                c["ready"] = min(c["ready"], work.replicas)
        if result.delete_legacy:
            self.legacy = False
        self.events += [(e.reason, e.message) for e in result.events]
        self.last = result
        return result

    def run_for(self, seconds: float, every: float = 5) -> None:
        end = self.now + datetime.timedelta(seconds=seconds)
        while self.now < end:
            self.now += datetime.timedelta(seconds=every)
            self.step()

    def pods(self) -> tuple[int, int]:
        return self.colours["b"]["replicas"], self.colours["g"]["replicas"]

    def reasons(self) -> list[str]:
        return [reason for reason, _ in self.events]

    @property
    def phase(self) -> str:
        assert self.state is not None
        return self.state.phase


def blue_green(**extra: Any) -> Strategy:
    body: dict[str, Any] = {
        "type": "BlueGreen",
        "blueGreen": {"observeWindow": "5m", "scaleDownDelay": "10m"},
        "analysis": {"prometheus": {"address": "http://127.0.0.1:9"}, "interval": "1m"},
    }
    body.update(extra)
    return Strategy.model_validate(body)


def canary(**extra: Any) -> Strategy:
    body: dict[str, Any] = {
        "type": "Canary",
        "canary": {"stepWeight": 25, "maxWeight": 50, "interval": "1m", "threshold": 2},
        "analysis": {"prometheus": {"address": "http://127.0.0.1:9"}},
    }
    body.update(extra)
    return Strategy.model_validate(body)


def roll(world: World, target: Target) -> None:
    """Change the spec's revision: one reconcile deploys, the next finds the pods ready."""
    world.target = target
    world.step()
    assert world.phase == "Deploying", world.events[-1:]
    world.step()


def settled(world: World) -> World:
    world.step()
    assert world.phase == "Stable" and world.pods() == (world.replicas, 0)
    return world


# ---------------------------------------------------------------------------------------
# Blue-green
# ---------------------------------------------------------------------------------------


def test_first_revision_goes_to_blue_without_checks() -> None:
    world = settled(World(blue_green()))
    assert world.last is not None and world.last.service_colour == "blue"
    assert world.asked == []
    assert world.state is not None and world.state.stable_revision == "rev1"


def test_blue_green_promotes_after_smoke_test_and_observe_window() -> None:
    world = settled(World(blue_green()))
    roll(world, V2)
    assert world.last is not None
    assert world.asked == ["smoke"]
    assert world.phase == "Observing"
    assert world.last.service_colour == "green" and world.last.preview_colour == "green"
    assert world.pods() == (4, 4)
    world.run_for(4 * 60)
    assert world.phase == "Observing"
    world.run_for(65)
    assert world.phase == "Stable"
    assert world.state is not None and world.state.stable_colour == "green"
    assert world.asked.count("analysis") == 5
    # Blue is kept for the scale-down delay, then scaled to zero.
    assert world.pods() == (4, 4)
    world.run_for(10 * 60)
    assert world.pods() == (0, 4)
    assert world.last.service_colour == "green"
    assert world.reasons()[-3:] == ["AnalysisPassed", "Promoted", "ScaledDown"]
    assert world.state.scale_down_at is None
    assert [r.outcome for r in world.state.history] == ["Promoted", "Promoted"]


def test_blue_green_switches_back_when_analysis_fails_in_the_window() -> None:
    world = settled(World(blue_green()))
    roll(world, V2)
    world.run_for(60)
    world.analysis = bad()
    world.run_for(60)
    assert world.phase == "RolledBack"
    assert world.last is not None and world.last.service_colour == "blue"
    assert world.pods() == (4, 0)
    assert world.state is not None and world.state.rejected_revision == "rev2"
    assert "AnalysisFailed" in world.reasons() and world.reasons()[-1] == "AnalysisFailed"
    # The rejected revision is not tried again while the spec names it...
    world.analysis = good()
    world.run_for(120)
    assert world.phase == "RolledBack" and world.pods() == (4, 0)
    # ...and a new one starts a new rollout, on green again.
    roll(world, V3)
    assert world.phase == "Observing" and world.last.service_colour == "green"


def test_smoke_test_failure_never_moves_traffic() -> None:
    world = settled(World(blue_green()))
    world.smoke = (False, "SMTP greeting: 421 4.3.2 maintenance")
    roll(world, V2)
    assert world.phase == "RolledBack"
    assert world.last is not None and world.last.service_colour == "blue"
    assert world.pods() == (4, 0)
    assert "Switched" not in world.reasons()
    assert "421 4.3.2" in world.events[-1][1]


def test_pods_not_ready_by_the_deadline_roll_back() -> None:
    world = settled(World(blue_green(progressDeadline="2m")))
    world.instant = False
    roll(world, V2)
    assert world.phase == "Deploying" and world.pods() == (4, 4)
    world.run_for(115)
    assert world.phase == "Deploying"
    world.run_for(10)
    assert world.phase == "RolledBack" and world.pods() == (4, 0)
    assert world.reasons()[-1] == "ProgressDeadlineExceeded"


def test_inconclusive_analysis_pauses_and_resume_continues() -> None:
    world = settled(World(blue_green()))
    world.analysis = [
        *empty(),
        CheckOutcome("queue-age", "Inconclusive", None, "no data"),
        CheckOutcome("latency-p95", "Inconclusive", None, "Prometheus unreachable"),
    ]
    roll(world, V2)
    world.run_for(3 * 60)
    assert world.state is not None and world.state.paused
    assert world.state.pause_reason == "InconclusiveAnalysis"
    # Checks that were inconclusive alike are named together, once.
    assert world.state.message is not None
    assert "(success-rate, queue-age: no data; latency-p95: Prometheus unreachable)" in (
        world.state.message
    )
    assert world.phase == "Observing" and world.last is not None
    assert world.last.service_colour == "green"
    # Paused: the window does not run out on its own.
    world.run_for(10 * 60)
    assert world.phase == "Observing" and world.state.paused
    world.analysis = good()
    world.controls = Controls(resume="first")
    world.step()
    assert not world.state.paused and "Resumed" in world.reasons()
    world.run_for(5 * 60 + 5)
    assert world.phase == "Stable" and world.state.stable_revision == "rev2"


def test_confirmation_webhook_holds_the_switch_until_it_says_yes() -> None:
    strategy = blue_green(confirmPromotionWebhook={"url": "http://127.0.0.1:9/confirm"})
    world = settled(World(strategy))
    world.confirmation = (False, "answered HTTP 409")
    roll(world, V2)
    assert world.phase == "AwaitingConfirmation"
    assert world.last is not None and world.last.service_colour == "blue"
    world.run_for(60)
    assert world.phase == "AwaitingConfirmation"
    world.confirmation = (True, "confirmed (HTTP 200)")
    world.run_for(15)  # asked again on its own clock
    assert world.phase == "Observing" and world.last.service_colour == "green"


def test_manual_abort_pause_and_promote() -> None:
    world = settled(World(blue_green()))
    roll(world, V2)
    world.controls = Controls(paused=True)
    world.run_for(20 * 60)
    assert world.phase == "Observing" and world.state is not None and world.state.paused
    world.controls = Controls(promote=frozenset({"rev2"}))
    world.step()
    assert world.phase == "Stable" and world.state.stable_revision == "rev2"
    world.controls = Controls()
    roll(world, V3)
    assert world.last is not None and world.last.service_colour == "blue"
    world.controls = Controls(abort=frozenset({"rev3"}))
    world.step()
    assert world.phase == "Aborted"
    assert world.last.service_colour == "green" and world.pods() == (0, 4)
    assert world.state.stable_revision == "rev2" and world.state.rejected_revision == "rev3"
    # A stale control naming an older revision does nothing to the next rollout.
    roll(world, V1)
    assert world.phase == "Observing"


def test_a_retry_left_in_place_retries_once() -> None:
    world = settled(World(blue_green()))
    roll(world, V2)
    world.analysis = bad()
    world.run_for(60)
    assert world.phase == "RolledBack" and world.state is not None
    # The retry control rolls the rejected revision out again, once.
    world.controls = Controls(retry=frozenset({"rev2"}))
    world.step()
    assert world.phase == "Deploying"
    world.run_for(120)
    assert world.phase == "RolledBack"
    world.run_for(10 * 60)
    assert world.phase == "RolledBack" and world.pods() == (4, 0)
    assert world.reasons().count("RolloutStarted") == 3  # first, rev2, the one retry
    # Taken away and given again: one more try.
    world.controls = Controls()
    world.step()
    world.controls = Controls(retry=frozenset({"rev2"}))
    world.step()
    assert world.phase == "Deploying"


def test_abort_during_a_retry_does_not_start_it_again() -> None:
    # Both controls left in place: retry once, abort, and stay aborted (no switch loop).
    world = settled(World(blue_green()))
    roll(world, V2)
    world.analysis = bad()
    world.run_for(60)
    world.analysis = good()
    world.controls = Controls(retry=frozenset({"rev2"}))
    roll(world, V2)
    assert world.phase == "Observing"
    world.controls = Controls(retry=frozenset({"rev2"}), abort=frozenset({"rev2"}))
    world.run_for(5 * 60)
    assert world.phase == "Aborted" and world.pods() == (4, 0)
    assert world.reasons().count("Switched") == 2


def test_manual_rollback_within_the_delay_is_a_switch() -> None:
    world = settled(World(blue_green()))
    roll(world, V2)
    world.run_for(6 * 60)
    assert world.phase == "Stable" and world.pods() == (4, 4)
    asked = len(world.asked)
    world.controls = Controls(rollback=frozenset({"rev2"}))
    world.step()
    assert world.phase == "Stable" and world.reasons()[-1] == "RolledBack"
    assert world.state is not None and world.state.stable_revision == "rev1"
    assert world.state.stable_colour == "blue"
    assert world.last is not None and world.last.service_colour == "blue"
    assert world.asked[asked:] == ["smoke"]
    assert world.state.rejected_revision == "rev2"
    # The spec still names rev2, which stays rolled back.
    world.run_for(15 * 60)
    assert world.state.stable_revision == "rev1" and world.pods() == (4, 0)


def test_spec_change_mid_rollout_returns_traffic_then_starts_again() -> None:
    world = settled(World(blue_green()))
    roll(world, V2)
    assert world.last is not None and world.last.service_colour == "green"
    world.target = V3
    world.step()
    assert "Superseded" in world.reasons() and world.last.service_colour == "blue"
    world.step()
    assert world.state is not None and world.state.candidate_revision == "rev3"
    world.step()
    assert world.last.service_colour == "green" and world.colours["g"]["revision"] == "rev3"


def test_migration_from_a_plain_deployment_keeps_it_until_blue_serves() -> None:
    world = World(blue_green(), legacy=True, instant=False)
    world.step()
    assert world.last is not None and world.last.service_colour is None
    assert world.legacy
    world.colours["b"]["ready"] = 4
    world.step()
    assert world.last.service_colour == "blue" and not world.legacy


# ---------------------------------------------------------------------------------------
# Canary
# ---------------------------------------------------------------------------------------


def test_canary_promotes_through_every_step() -> None:
    world = settled(World(canary(), replicas=4))
    roll(world, V2)
    assert world.last is not None and world.last.service_colour is None
    assert world.phase == "CanaryStep" and world.pods() == (3, 1)
    world.step()
    assert world.state is not None and world.state.actual_weight == 25
    world.run_for(60)
    assert world.phase == "CanaryStep" and world.state.set_weight == 50
    world.step()
    assert world.pods() == (2, 2)
    # Each step's interval counts from when its pods serve; then promotion scales it up.
    world.run_for(70)
    assert world.phase == "Stable" and world.state.stable_colour == "green"
    assert world.pods() == (0, 4)
    weights = [m for r, m in world.events if r == "CanaryWeight"]
    assert len(weights) == 2 and "25%" in weights[0] and "50%" in weights[1]


def test_canary_rolls_back_after_threshold_failed_analyses() -> None:
    world = settled(World(canary(), replicas=4))
    roll(world, V2)
    world.analysis = bad()
    world.run_for(60)
    assert world.phase == "CanaryStep" and world.state is not None
    assert world.state.failed_checks == 1 and world.state.set_weight == 25
    world.run_for(60)
    assert world.phase == "RolledBack" and world.pods() == (4, 0)
    assert world.state.rejected_revision == "rev2"


def test_canary_never_lowers_stable_capacity_before_canary_pods_serve() -> None:
    world = settled(World(canary(), replicas=4))
    world.instant = False
    roll(world, V2)
    assert world.pods() == (4, 1)
    world.colours["g"]["ready"] = 1
    world.step()
    assert world.pods() == (3, 1)


def test_canary_without_analysis_advances_on_time() -> None:
    world = settled(World(canary(analysis=None), replicas=10))
    roll(world, V2)
    assert world.pods() == (7, 3)  # 25% of 10 pods rounds to 3
    world.run_for(130)
    assert world.phase == "Stable" and world.asked == ["smoke"]


@pytest.mark.parametrize("replicas", [1, 2])
def test_canary_keeps_one_stable_pod_until_promotion(replicas: int) -> None:
    world = settled(World(canary(), replicas=replicas))
    roll(world, V2)
    assert world.pods() == (1, 1)


def test_a_refusing_webhook_is_asked_on_its_own_clock_not_per_event() -> None:
    hook = {"url": "http://127.0.0.1:9/confirm"}
    world = settled(World(blue_green(confirmPromotionWebhook=hook)))
    world.confirmation = (False, "answered HTTP 409")
    roll(world, V2)
    assert world.phase == "AwaitingConfirmation"
    # Reconciles every second (Deployment events) for a minute: about one ask per 15 s.
    world.run_for(60, every=1)
    assert 4 <= world.asked.count("confirmation") <= 6, world.asked
    world.confirmation = (True, "confirmed (HTTP 200)")
    world.run_for(16, every=1)
    assert world.phase == "Observing"
    assert world.state is not None and world.state.next_confirmation_at is None
