"""Blue-green and canary rollouts as a pure state machine over status.rollout.

`plan()` takes what the operator observed (the revision the spec asks for, both colour
Deployments, the controls a person set, and the results of any smoke test, analysis or
webhook it asked for) together with the rollout state last written to the status, and
returns the next state and the children that state implies: each colour's revision and
replica count, and where the Services point. It never talks to the cluster, so every
path through a rollout is tested without one.

Two Deployments, `<name>-blue` and `<name>-green`, serve both strategies. The stable
revision runs in one colour and a candidate goes to the other:

- Blue-green: the Service selects one colour; the candidate is smoke tested through the
  preview Service, traffic is switched, watched for the observe window, and switched back
  if analysis fails. The old colour stays scaled for `scaleDownDelay`, so a rollback in
  that time is a selector change.
- Canary: the Service selects both colours, so each colour's share of ready pods is its
  share of SMTP sessions; the candidate grows a step at a time, analysed at every step.

The state is written to the status *before* the operator acts on it. An operator killed
between the two finds the state already moved on and applies the same children again,
which is idempotent: a switch is never taken twice, nor taken back by a stale replay.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from relay_operator.models import (
    DURATION_PATTERN,
    BlueGreen,
    Canary,
    CheckResult,
    RevisionRecord,
    RolloutStatus,
    Strategy,
)

Colour = Literal["blue", "green"]
COLOURS: tuple[Colour, Colour] = ("blue", "green")
Verdict = Literal["Pass", "Fail", "Inconclusive"]

# Phases in which no rollout is running: a new revision in the spec starts one.
IDLE = ("Stable", "RolledBack", "Aborted")
HISTORY = 10
# A refused confirmation is asked again after this long.
WEBHOOK_RETRY_S = 15.0


def other(colour: Colour) -> Colour:
    return "green" if colour == "blue" else "blue"


_DURATION = re.compile(DURATION_PATTERN)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_s(value: str) -> float:
    """The spec's duration spelling (`500ms`, `30s`, `5m`, `2h`, `1d`) in seconds."""
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 30s, 5m, 2h, 1d)")
    return float(value[: match.start(1)]) * _UNIT_SECONDS[match[1]]


# What a rollout that has ended (promoted, rolled back, aborted) leaves of its candidate.
_NO_CANDIDATE: dict[str, Any] = {
    "candidate_revision": None,
    "candidate_colour": None,
    "candidate_image": None,
    "set_weight": 0,
    "next_analysis_at": None,
    "next_confirmation_at": None,
    "rollback": False,
}


def _grouped(outcomes: Iterable[CheckOutcome]) -> str:
    """`a, b: no data; c: HTTP 503`: checks that failed alike, said once."""
    by_message: dict[str, list[str]] = {}
    for outcome in outcomes:
        by_message.setdefault(outcome.message, []).append(outcome.name)
    return "; ".join(f"{', '.join(names)}: {message}" for message, names in by_message.items())


def _time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _stamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# What goes in
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColourState:
    """One colour Deployment as found."""

    exists: bool = False
    revision: str | None = None  # the revision label of its pod template
    replicas: int = 0  # spec.replicas
    available: int = 0  # pods of the current template that are available
    settled: bool = False  # the Deployment controller has caught up with the spec

    def serving(self, revision: str, count: int) -> bool:
        """`count` pods of `revision` are available."""
        if count == 0:
            return True
        return (
            self.exists and self.revision == revision and self.settled and (self.available >= count)
        )


@dataclass(frozen=True)
class Controls:
    """What a person asked for, from spec.strategy and the annotations.

    promote, abort, rollback and retry hold revision names (from the spec field and the
    annotation both): each acts only on the revision it names.
    """

    paused: bool = False
    promote: frozenset[str] = frozenset()
    abort: frozenset[str] = frozenset()
    rollback: frozenset[str] = frozenset()
    retry: frozenset[str] = frozenset()
    resume: str | None = None


@dataclass(frozen=True)
class Target:
    """The revision the spec asks for, as built."""

    revision: str
    image: str
    config_hash: str


@dataclass(frozen=True)
class CheckOutcome:
    """An analysis check's result (analysis.run produces them)."""

    name: str
    outcome: Verdict
    value: float | None
    message: str

    def as_status(self) -> dict[str, Any]:
        found: dict[str, Any] = {"name": self.name, "outcome": self.outcome}
        if self.value is not None:
            found["value"] = self.value
        found["message"] = self.message[:1024]
        return found


@dataclass(frozen=True)
class Observed:
    """Everything plan() decides from, apart from the state itself."""

    now: datetime.datetime
    target: Target
    replicas: int
    colours: dict[Colour, ColourState]
    controls: Controls = Controls()
    legacy: bool = False  # a Deployment from before the strategy was set still exists
    smoke: tuple[bool, str] | None = None
    analysis: Sequence[CheckOutcome] | None = None
    confirmation: tuple[bool, str] | None = None


# ---------------------------------------------------------------------------------------
# What comes out
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What one colour Deployment should run."""

    revision: str | None  # None: leave the template as it is (it may not exist yet)
    replicas: int


@dataclass(frozen=True)
class Announcement:
    """An Event to post (and log)."""

    reason: str
    message: str
    warning: bool = False


Need = Literal["smoke", "analysis", "confirmation"]


@dataclass
class Plan:
    """The next state, and the children and Events it implies."""

    state: RolloutStatus
    workloads: dict[Colour, Workload] = field(default_factory=dict)
    # Blue-green: the colour the Service selects. None: every colour (canary, migration).
    service_colour: Colour | None = None
    preview_colour: Colour | None = None
    delete_legacy: bool = False
    events: list[Announcement] = field(default_factory=list)
    wake_at: datetime.datetime | None = None
    need: Need | None = None  # ask for this, then plan again with the answer


# ---------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------


class _Planner:
    """One planning pass; methods are the phases."""

    def __init__(self, strategy: Strategy, state: RolloutStatus, seen: Observed) -> None:
        self.strategy = strategy
        self.seen = seen
        self.now = seen.now
        self.state = state
        self.events: list[Announcement] = []
        self.wakes: list[datetime.datetime] = []
        self.need: Need | None = None
        self.delete_legacy = False
        self.blue_green: BlueGreen = strategy.blue_green or BlueGreen()
        self.canary: Canary = strategy.canary or Canary()

    # --- helpers ---------------------------------------------------------------------

    @property
    def is_canary(self) -> bool:
        return self.strategy.type == "Canary"

    def set(self, **changes: Any) -> None:
        self.state = self.state.model_copy(update=changes)

    def move(self, phase: str, message: str) -> None:
        self.set(phase=phase, message=message, phase_since=_stamp(self.now))

    def say(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append(Announcement(reason, message, warning))

    def wake(self, after_s: float, since: datetime.datetime | None = None) -> None:
        self.wakes.append((since or self.now) + datetime.timedelta(seconds=after_s))

    def since(self) -> datetime.datetime:
        return _time(self.state.phase_since) or self.now

    def elapsed(self, moment: str | None) -> float:
        start = _time(moment) or self.now
        return (self.now - start).total_seconds()

    def names_candidate(self, revisions: frozenset[str]) -> bool:
        return self.state.candidate_revision in revisions

    @property
    def replicas(self) -> int:
        return self.seen.replicas

    def split(self, weight: int) -> tuple[int, int]:
        """Canary and stable pod counts for a weight, each at least one below 100%."""
        n = self.replicas
        if n == 0:
            return 0, 0
        if weight >= 100:
            return n, 0
        canary = max(1, math.floor(n * weight / 100 + 0.5))
        stable = max(1, n - canary)
        return canary, stable

    # --- the pass ----------------------------------------------------------------------

    def run(self) -> Plan:
        if self.state.stable_revision is None or self.state.stable_colour is None:
            self.bootstrap()
        elif self.state.phase in IDLE:
            self.idle()
        else:
            self.in_progress()
        return self.result()

    def bootstrap(self) -> None:
        """First revision: nothing to compare it with, so it becomes stable directly."""
        target = self.seen.target
        self.set(
            stable_revision=target.revision,
            stable_colour="blue",
            stable_image=target.image,
            active_colour="blue",
        )
        self.move("Stable", f"revision {target.revision} is stable in blue")
        self.record(target.revision, target.image, target.config_hash, "Promoted")
        self.say(
            "RolloutStarted",
            f"first revision {target.revision} ({target.image}) deployed to blue",
        )

    def idle(self) -> None:
        state, target, controls = self.state, self.seen.target, self.seen.controls
        if state.stable_revision in controls.rollback:
            self.start_rollback()
            return
        if target.revision == state.stable_revision:
            if state.phase != "Stable" and state.rejected_revision != target.revision:
                # The spec went back to the stable revision after a rollback: settled.
                self.move("Stable", f"revision {target.revision} is stable")
            return
        # A retry is used once: a control left in Git must not retry a revision that failed
        # again, over and over. Taking the control away re-arms it.
        if state.handled_retry is not None and state.handled_retry not in controls.retry:
            self.set(handled_retry=None)
        retried = target.revision in controls.retry and self.state.handled_retry != target.revision
        if target.revision == state.rejected_revision:
            if not retried:
                return
            self.set(handled_retry=target.revision)
        self.start(target.revision, target.image, rollback=False)

    def start(self, revision: str, image: str, *, rollback: bool) -> None:
        assert self.state.stable_colour is not None
        colour = other(self.state.stable_colour)
        self.set(
            candidate_revision=revision,
            candidate_colour=colour,
            candidate_image=image,
            rollback=rollback,
            failed_checks=0,
            inconclusive_checks=0,
            analyses=0,
            last_checks=[],
            paused=False,
            pause_reason=None,
            next_analysis_at=None,
            next_confirmation_at=None,
            rejected_revision=None if rollback else self.state.rejected_revision,
            set_weight=0 if not self.is_canary or rollback else self.canary.step_weight,
        )
        if self.state.rejected_revision == revision:
            self.set(rejected_revision=None)
        what = "rollback" if rollback else self.strategy.type
        self.move("Deploying", f"deploying revision {revision} to {colour}")
        self.say(
            "RolloutStarted",
            f"{what}: revision {self.state.stable_revision} ({self.state.stable_image}) -> "
            f"{revision} ({image}), deploying to {colour}",
        )
        # A rollback within the scale-down delay finds its pods still serving.
        self.deploying()

    def start_rollback(self) -> None:
        previous = self.previous_revision()
        if previous is None:
            self.say(
                "RollbackImpossible",
                f"no revision before {self.state.stable_revision} in the history",
                warning=True,
            )
            return
        self.start(previous.revision, previous.image, rollback=True)

    def previous_revision(self) -> RevisionRecord | None:
        for record in reversed(self.state.history):
            promoted = record.outcome == "Promoted"
            if promoted and record.revision != self.state.stable_revision:
                return record
        return None

    # --- a rollout in progress -----------------------------------------------------------

    def in_progress(self) -> None:
        state, controls, target = self.state, self.seen.controls, self.seen.target
        if self.names_candidate(controls.abort) or state.stable_revision in controls.rollback:
            self.end("Aborted", "Aborted", "aborted by request", reject=True)
            return
        superseded = not state.rollback and target.revision != state.candidate_revision
        if superseded:
            # The spec moved on mid-rollout: traffic goes home, then the new one starts.
            self.end("Aborted", "Superseded", f"superseded by revision {target.revision}")
            return
        if self.names_candidate(controls.promote) and state.phase not in ("Deploying", "Promoting"):
            self.promote_now()
            return
        if self.pause_changes():
            return
        step = {
            "Deploying": self.deploying,
            "SmokeTesting": self.smoke_testing,
            "AwaitingConfirmation": self.awaiting_confirmation,
            "Observing": self.observing,
            "CanaryStep": self.canary_step,
            "Promoting": self.promoting,
            "RollingBack": self.rolling_back,
        }[state.phase]
        step()

    def pause_changes(self) -> bool:
        """Hold while paused; on resume, the current step's clocks start again."""
        state, controls = self.state, self.seen.controls
        resumed = controls.resume is not None and controls.resume != state.handled_resume
        if resumed:
            self.set(handled_resume=controls.resume)
        if state.paused and state.pause_reason not in (None, "Requested") and not resumed:
            return True  # paused by the operator: only resume, promote or abort move it
        wanted = controls.paused
        if wanted and not state.paused:
            self.set(paused=True, pause_reason="Requested")
            self.say("Paused", f"rollout of {state.candidate_revision} paused by request")
            return True
        if wanted:
            return True
        if state.paused:
            restart = _stamp(self.now)
            self.set(
                paused=False,
                pause_reason=None,
                inconclusive_checks=0,
                phase_since=restart,
                switched_at=restart if state.phase == "Observing" else state.switched_at,
                next_analysis_at=None,
            )
            self.say("Resumed", f"rollout of {state.candidate_revision} resumed")
        return False

    def ready(self) -> bool:
        state = self.state
        assert state.candidate_colour and state.candidate_revision
        wanted = self.candidate_count()
        return self.seen.colours[state.candidate_colour].serving(state.candidate_revision, wanted)

    def candidate_count(self) -> int:
        if self.state.phase == "Promoting" or not self.is_canary or self.state.rollback:
            return self.replicas
        return self.split(self.state.set_weight)[0]

    def deadline_passed(self) -> bool:
        limit = duration_s(self.strategy.progress_deadline)
        if self.elapsed(self.state.phase_since) > limit:
            return True
        self.wake(limit, self.since())
        return False

    def deploying(self) -> None:
        if not self.ready():
            if self.deadline_passed():
                self.end(
                    "RolledBack",
                    "ProgressDeadlineExceeded",
                    f"pods of revision {self.state.candidate_revision} not ready within "
                    f"{self.strategy.progress_deadline}",
                    reject=True,
                )
            else:
                self.set(
                    message=f"waiting for {self.candidate_count()} pods of revision "
                    f"{self.state.candidate_revision} in {self.state.candidate_colour}"
                )
            return
        if self.promote_requested():
            self.promote_now()
        elif self.strategy.smoke_test.enabled and self.replicas > 0:
            self.move("SmokeTesting", "smoke testing through the preview Service")
            self.smoke_testing()
        else:
            self.after_smoke()

    def smoke_testing(self) -> None:
        if self.seen.smoke is None:
            self.need = "smoke"
            return
        ok, message = self.seen.smoke
        if not ok:
            self.end("RolledBack", "SmokeTestFailed", f"smoke test failed: {message}", reject=True)
            return
        self.say("SmokeTestPassed", message)
        self.after_smoke()

    def after_smoke(self) -> None:
        if self.state.rollback:
            self.switch()
            return
        if self.is_canary:
            self.enter_step()
        elif self.strategy.confirm_promotion_webhook is not None:
            self.move("AwaitingConfirmation", "asking the confirm-promotion webhook")
            self.awaiting_confirmation()
        else:
            self.switch()

    def awaiting_confirmation(self) -> None:
        # Every Deployment event reconciles the relay; the webhook is asked on its own
        # clock, not once per event.
        due = _time(self.state.next_confirmation_at)
        if due is not None and self.now < due:
            self.wakes.append(due)
            return
        if self.seen.confirmation is None:
            self.need = "confirmation"
            return
        ok, message = self.seen.confirmation
        if not ok:
            again = self.now + datetime.timedelta(seconds=WEBHOOK_RETRY_S)
            self.set(
                message=f"promotion not confirmed: {message}; asking again",
                next_confirmation_at=_stamp(again),
            )
            self.wake(WEBHOOK_RETRY_S)
            return
        self.set(next_confirmation_at=None)
        self.say("PromotionConfirmed", message)
        if self.is_canary:
            self.begin_promotion()
        else:
            self.switch()

    # --- blue-green ------------------------------------------------------------------------

    def switch(self) -> None:
        state = self.state
        assert state.candidate_colour is not None
        old = state.active_colour or state.stable_colour
        self.set(active_colour=state.candidate_colour, switched_at=_stamp(self.now))
        if self.is_canary or state.rollback or self.promote_requested():
            self.say("Switched", f"traffic moved from {old} to {state.candidate_colour}")
            self.complete()
            return
        window = self.blue_green.observe_window
        self.move("Observing", f"traffic on {state.candidate_colour}; observing for {window}")
        self.set(next_analysis_at=self.first_analysis())
        self.say(
            "Switched",
            f"traffic moved from {old} to {state.candidate_colour} (revision "
            f"{state.candidate_revision}); observing for {window}",
        )
        self.observing()

    def observing(self) -> None:
        if self.analysis_due():
            if not self.analyse(limit=1):
                return
        window = duration_s(self.blue_green.observe_window)
        if self.elapsed(self.state.switched_at) >= window:
            self.complete()
            return
        self.wake(window, _time(self.state.switched_at))

    # --- canary ----------------------------------------------------------------------------

    def enter_step(self) -> None:
        weight = self.state.set_weight
        self.move("CanaryStep", f"canary at weight {weight}%")
        self.set(next_analysis_at=None)
        self.say("CanaryWeight", f"revision {self.state.candidate_revision} at weight {weight}%")
        self.canary_step()

    def canary_step(self) -> None:
        if not self.ready():
            if self.deadline_passed():
                self.end(
                    "RolledBack",
                    "ProgressDeadlineExceeded",
                    f"canary pods not ready within {self.strategy.progress_deadline}",
                    reject=True,
                )
            return
        if self.state.next_analysis_at is None:
            # The step's interval counts from when its pods are serving.
            self.set(next_analysis_at=self.first_analysis())
        due = _time(self.state.next_analysis_at)
        assert due is not None
        if self.now < due:
            self.wake(0, due)
            return
        if self.strategy.analysis is not None:
            if not self.analyse(limit=self.canary.threshold):
                return
        else:
            self.set(next_analysis_at=None)
        self.next_step()

    def next_step(self) -> None:
        weight = self.state.set_weight
        if weight >= self.canary.max_weight:
            if self.strategy.confirm_promotion_webhook is not None:
                self.move("AwaitingConfirmation", "asking the confirm-promotion webhook")
                self.awaiting_confirmation()
            else:
                self.begin_promotion()
            return
        self.set(set_weight=min(weight + self.canary.step_weight, self.canary.max_weight))
        self.enter_step()

    def begin_promotion(self) -> None:
        self.move("Promoting", f"scaling revision {self.state.candidate_revision} to all pods")
        self.say("Promoting", f"revision {self.state.candidate_revision} to 100%")
        self.promoting()

    def promoting(self) -> None:
        if self.ready():
            self.complete()

    # --- analysis ------------------------------------------------------------------------

    def interval_s(self) -> float:
        if self.is_canary:
            return duration_s(self.canary.interval)
        analysis = self.strategy.analysis
        return duration_s(analysis.interval if analysis else "1m")

    def first_analysis(self) -> str:
        return _stamp(self.now + datetime.timedelta(seconds=self.interval_s()))

    def analysis_due(self) -> bool:
        if self.strategy.analysis is None:
            return False
        due = _time(self.state.next_analysis_at)
        if due is None or self.now >= due:
            return True
        self.wake(0, due)
        return False

    def analyse(self, *, limit: int) -> bool:
        """Take the analysis in; False when the rollout stops here (failed or paused)."""
        if self.seen.analysis is None:
            self.need = "analysis"
            return False
        outcomes = list(self.seen.analysis)
        verdict = _verdict(outcomes)
        state = self.state
        next_at = _stamp(self.now + datetime.timedelta(seconds=self.interval_s()))
        self.set(
            analyses=state.analyses + 1,
            last_checks=[CheckResult.model_validate(o.as_status()) for o in outcomes][:16],
            next_analysis_at=next_at,
        )
        self.wake(self.interval_s())
        if verdict == "Fail":
            failed = [o.message for o in outcomes if o.outcome == "Fail"]
            count = state.failed_checks + 1
            self.set(failed_checks=count, inconclusive_checks=0)
            if count < limit:
                self.say("AnalysisFailed", f"{count}/{limit}: " + "; ".join(failed), warning=True)
            else:
                # One Event for the last failure: the rollback's, under the same reason.
                self.end(
                    "RolledBack",
                    "AnalysisFailed",
                    f"{count} failed analyses: " + "; ".join(failed),
                    reject=True,
                )
            return False
        if verdict == "Inconclusive":
            count = state.inconclusive_checks + 1
            self.set(inconclusive_checks=count)
            unclear = _grouped(o for o in outcomes if o.outcome != "Pass")
            assert self.strategy.analysis is not None
            if count >= self.strategy.analysis.inconclusive_limit:
                self.set(paused=True, pause_reason="InconclusiveAnalysis")
                self.set(
                    message=f"paused after {count} inconclusive analyses ({unclear}); "
                    "resume, promote or abort it"
                )
                self.say(
                    "AnalysisInconclusive",
                    f"paused after {count} inconclusive analyses: {unclear}",
                    warning=True,
                )
                return False
            self.say("AnalysisInconclusive", f"{count} in a row: {unclear}", warning=True)
            return False
        self.set(inconclusive_checks=0)
        self.say("AnalysisPassed", "; ".join(o.message for o in outcomes))
        return True

    # --- the ends ----------------------------------------------------------------------------

    def promote_requested(self) -> bool:
        return self.names_candidate(self.seen.controls.promote)

    def promote_now(self) -> None:
        """Skip what is left: smoke test, confirmation, analysis, steps, observe window."""
        self.set(paused=False, pause_reason=None)
        self.say("PromotedByRequest", f"revision {self.state.candidate_revision} promoted now")
        if self.is_canary:
            self.begin_promotion()
        elif self.state.phase == "Observing":
            self.complete()
        else:
            self.switch()

    def complete(self) -> None:
        """The candidate becomes the stable revision."""
        state = self.state
        assert state.candidate_colour and state.candidate_revision and state.stable_colour
        old_colour, old_revision = state.stable_colour, state.stable_revision
        delay = 0.0 if self.is_canary else duration_s(self.blue_green.scale_down_delay)
        self.record(
            state.candidate_revision,
            state.candidate_image or "",
            self.seen.target.config_hash if not state.rollback else "",
            "Promoted",
        )
        if state.rollback and old_revision:
            self.record(old_revision, state.stable_image or "", "", "RolledBack", "by request")
        self.set(
            stable_revision=state.candidate_revision,
            stable_colour=state.candidate_colour,
            stable_image=state.candidate_image,
            active_colour=state.candidate_colour,
            **_NO_CANDIDATE,
            scale_down_colour=old_colour,
            scale_down_at=_stamp(self.now + datetime.timedelta(seconds=delay)),
            rejected_revision=old_revision if state.rollback else None,
        )
        if delay:
            self.wake(delay)
        self.move(
            "Stable", f"revision {state.candidate_revision} is stable in {state.candidate_colour}"
        )
        reason = "RolledBack" if state.rollback else "Promoted"
        self.say(
            reason, f"revision {state.candidate_revision} is stable in {state.candidate_colour}"
        )

    def end(self, phase: str, reason: str, message: str, *, reject: bool = False) -> None:
        """Traffic back to the stable revision; the candidate is scaled away.

        `reject`: the candidate failed or was aborted, so it is not rolled out again until
        the spec changes (or retryRevision names it). A superseded candidate is not.
        """
        state = self.state
        revision = state.candidate_revision
        rejected = state.rejected_revision
        if reject and revision and not state.rollback:
            outcome = "Aborted" if phase == "Aborted" else "RolledBack"
            self.record(
                revision,
                state.candidate_image or "",
                self.seen.target.config_hash,
                outcome,
                message,
            )
            rejected = revision
        self.set(
            active_colour=state.stable_colour,
            **_NO_CANDIDATE,
            paused=False,
            pause_reason=None,
            scale_down_colour=state.candidate_colour,
            scale_down_at=_stamp(self.now),
            rejected_revision=rejected,
        )
        self.move(phase if reject else "Stable", f"{reason}: {message}")
        self.say(reason, f"revision {revision}: {message}", warning=reason != "Superseded")

    def rolling_back(self) -> None:  # kept for states written by a newer operator
        self.end("RolledBack", "RolledBack", "rolled back")

    def record(
        self, revision: str, image: str, config_hash: str, outcome: str, reason: str = ""
    ) -> None:
        entry = RevisionRecord(
            revision=revision,
            image=image,
            config_hash=config_hash,
            outcome=outcome,
            time=_stamp(self.now),
            reason=reason[:1024],
        )
        self.set(history=[*self.state.history, entry][-HISTORY:])

    # --- the children the state implies ----------------------------------------------------

    def result(self) -> Plan:
        state = self.state
        workloads: dict[Colour, Workload] = {}
        stable, candidate = state.stable_colour, state.candidate_colour
        assert stable is not None and state.stable_revision is not None
        n = self.replicas
        if candidate is not None and state.candidate_revision is not None:
            if self.is_canary and not state.rollback:
                ours = n if state.phase == "Promoting" else self.split(state.set_weight)[0]
                # The stable side shrinks only by canary pods already serving, so capacity
                # never dips while new pods start; it keeps one pod until promotion.
                ready = self.seen.colours[candidate].available
                floor = 0 if state.phase == "Promoting" else min(1, n)
                theirs = max(floor, n - min(ours, ready))
                workloads[candidate] = Workload(state.candidate_revision, ours)
                workloads[stable] = Workload(state.stable_revision, theirs)
                total = self.seen.colours[candidate].available + self.seen.colours[stable].available
                share = self.seen.colours[candidate].available / total if total else 0
                self.set(actual_weight=min(100, math.floor(share * 100 + 0.5)))
            else:
                workloads[candidate] = Workload(state.candidate_revision, n)
                workloads[stable] = Workload(state.stable_revision, n)
        else:
            workloads[stable] = Workload(state.stable_revision, n)
            idle = other(stable)
            due = _time(state.scale_down_at)
            keep = state.scale_down_colour == idle and due is not None and self.now < due
            workloads[idle] = Workload(None, n if keep else 0)
            if keep and due is not None:
                self.wakes.append(due)
            elif state.scale_down_colour is not None:
                # After a rollback the RolledBack Event already said so.
                if self.seen.colours[idle].replicas > 0 and state.phase == "Stable":
                    revision = self.seen.colours[idle].revision
                    self.say("ScaledDown", f"{idle} (revision {revision}) scaled to zero")
                self.set(scale_down_colour=None, scale_down_at=None)
            self.set(actual_weight=0)
        service: Colour | None = None
        if not self.is_canary:
            service = state.active_colour or stable
        migrating = self.seen.legacy and not self.seen.colours[stable].serving(
            state.stable_revision, n
        )
        if migrating:
            # Moving from a plain Deployment: both serve until the colour is ready.
            service = None
        else:
            self.delete_legacy = self.seen.legacy
        preview = candidate if candidate is not None else None
        return Plan(
            state=self.state,
            workloads=workloads,
            service_colour=service,
            preview_colour=preview,
            delete_legacy=self.delete_legacy,
            events=self.events,
            wake_at=min(self.wakes) if self.wakes else None,
            need=self.need,
        )


def _verdict(outcomes: Sequence[CheckOutcome]) -> Verdict:
    if any(o.outcome == "Fail" for o in outcomes):
        return "Fail"
    if not outcomes or any(o.outcome == "Inconclusive" for o in outcomes):
        return "Inconclusive"
    return "Pass"


def plan(strategy: Strategy, state: RolloutStatus | None, seen: Observed) -> Plan:
    """The next rollout state and the children it implies. Pure."""
    return _Planner(strategy, state or RolloutStatus(), seen).run()


def parse_state(raw: dict[str, Any] | None) -> RolloutStatus | None:
    return RolloutStatus.model_validate(raw) if raw else None


def dump_state(state: RolloutStatus) -> dict[str, Any]:
    return state.model_dump(mode="json", by_alias=True, exclude_none=True)


__all__ = [
    "COLOURS",
    "Announcement",
    "CheckOutcome",
    "ColourState",
    "Controls",
    "Observed",
    "Plan",
    "Target",
    "Workload",
    "dump_state",
    "duration_s",
    "other",
    "parse_state",
    "plan",
]
