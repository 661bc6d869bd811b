"""The four measurements of issue 9: ingest, latency, drain and memory.

Each starts what it needs in the run's temporary directory, measures, stops it again and
returns plain data for the JSON report. Runs that are profiled are extra runs: a sampled
process is never one whose rate goes into a median.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import RECIPIENT, SENDER, PacedResult, message, paced_load, smtp_source
from bench.measure import (
    CpuMeter,
    Profiler,
    disk_of,
    median,
    mib,
    percentile,
    rss_bytes,
    slope_per_minute,
)
from bench.servers import (
    PostfixHold,
    RelayProcess,
    Sink,
    count_messages,
    counters_per_message,
    drop_database,
    relay_config,
    server_counters,
    start_mariadb,
)
from tests.servers import MariaDB

# Targets from issue 9.
INGEST_RATIO_TARGET = 1.0
LATENCY_P95_TARGET_MS = 50.0
DRAIN_TARGET_MSG_S = 1000.0
RSS_TARGET_MIB = 150.0
MEMORY_RATE_TARGET = 1000.0


@dataclass
class Bench:
    """One benchmark run: its temporary directory, its servers, where artefacts go."""

    artefacts: Path
    profile: str = "auto"  # auto: profile where a target is missed; always; never
    keep: bool = False
    # smtp.processes of the relays in the ingest and latency runs.
    relay_processes: int = 1
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="relay-bench-")))
    mariadb_settings: dict[str, str] = field(default_factory=dict)
    _mariadb: MariaDB | None = None
    _postfix: PostfixHold | None = None
    _databases: int = 0

    def __post_init__(self) -> None:
        # Postfix's daemons run as the postfix user and must reach the queue directory.
        self.root.chmod(0o755)
        self.artefacts.mkdir(parents=True, exist_ok=True)

    def mariadb(self) -> MariaDB:
        if self._mariadb is None:
            self._mariadb, self.mariadb_settings = start_mariadb(self.root / "mariadb")
        return self._mariadb

    def postfix(self) -> PostfixHold:
        if self._postfix is None:
            self._postfix = PostfixHold.start(self.root / "postfix")
        return self._postfix

    def next_run(self) -> int:
        """The number the next run's database will have, to name its files after."""
        return self._databases + 1

    def new_database(self) -> str:
        self._databases += 1
        name = f"bench_{self._databases}"
        self.mariadb().create_database(name)
        return name

    def workdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def wants_profile(self, missed: bool) -> bool:
        return self.profile == "always" or (self.profile == "auto" and missed)

    def disks(self) -> dict[str, str]:
        found = {"temporary_directory": str(self.root)}
        if self._mariadb is not None:
            found["mariadb_datadir_device"] = disk_of(self._mariadb.directory)
        if self._postfix is not None:
            found["postfix_queue_device"] = disk_of(self._postfix.queue)
        return found

    def close(self) -> None:
        # Each server is stopped even if the one before failed to stop.
        try:
            if self._postfix is not None:
                self._postfix.stop()
        finally:
            if self._mariadb is not None:
                self._mariadb.stop()
            if not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)


# Ingest: smtp-source as fast as it goes, relay and Postfix in alternation


def ingest(
    bench: Bench, *, messages: int, sessions: int, size: int, repeats: int, warmup: int
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"relay": [], "postfix": []}
    for round_ in range(repeats):
        # Alternate who goes first, so a drift in the machine's load favours neither.
        order = ("relay", "postfix") if round_ % 2 == 0 else ("postfix", "relay")
        for target in order:
            run = _ingest_relay if target == "relay" else _ingest_postfix
            runs[target].append(
                run(bench, messages=messages, sessions=sessions, size=size, warmup=warmup)
            )
            print(
                f"  ingest round {round_ + 1}/{repeats} {target}: "
                f"{runs[target][-1]['msg_per_s']:.0f} msg/s",
                flush=True,
            )
    relay = median([r["msg_per_s"] for r in runs["relay"]])
    postfix = median([r["msg_per_s"] for r in runs["postfix"]])
    ratios = [
        r["msg_per_s"] / p["msg_per_s"] for r, p in zip(runs["relay"], runs["postfix"], strict=True)
    ]
    summary: dict[str, Any] = {
        "parameters": {
            "messages": messages,
            "sessions": sessions,
            "size": size,
            "repeats": repeats,
            "warmup": warmup,
            "relay_processes": bench.relay_processes,
        },
        "relay_msg_per_s": round(relay, 1),
        "postfix_msg_per_s": round(postfix, 1),
        "ratio_of_medians": round(relay / postfix, 3),
        "ratio_per_round": [round(r, 3) for r in ratios],
        "median_ratio": round(median(ratios), 3),
        "relay_cpu_ms_per_msg": round(
            median([r["relay_cpu_ms_per_msg"] for r in runs["relay"]]), 3
        ),
        "mariadb_cpu_ms_per_msg": round(
            median([r["mariadb_cpu_ms_per_msg"] for r in runs["relay"]]), 3
        ),
        "postfix_cpu_ms_per_msg": round(
            median([r["postfix_cpu_ms_per_msg"] for r in runs["postfix"]]), 3
        ),
        "mariadb_per_message": _median_counters(runs["relay"]),
        "target": f"relay / Postfix >= {INGEST_RATIO_TARGET}",
        "target_met": median(ratios) >= INGEST_RATIO_TARGET,
        "runs": runs,
    }
    if bench.wants_profile(not summary["target_met"]):
        summary["profile"] = _profile_ingest(
            bench, messages=messages, sessions=sessions, size=size, warmup=warmup
        )
    return summary


def _median_counters(runs: list[dict[str, Any]]) -> dict[str, float]:
    names = runs[0]["mariadb_per_message"] if runs else {}
    return {name: median([r["mariadb_per_message"][name] for r in runs]) for name in names}


def whatif(
    bench: Bench, *, messages: int, sessions: int, size: int, repeats: int, warmup: int
) -> dict[str, Any]:
    """The unchanged relay in other set-ups, to weigh the recommendations with numbers.

    uvloop: the same code on uvloop's event loop (libuv, transports in C). two_replicas:
    two relay processes on one MariaDB, smtp-source split between them, as two pods would.
    """
    variants: dict[str, dict[str, Any]] = {
        "baseline": {},
        "uvloop": {"loop": "uvloop"},
        "two_replicas": {"replicas": 2},
    }
    notes = []
    if importlib.util.find_spec("uvloop") is None:
        del variants["uvloop"]
        notes.append("uvloop is not installed in the venv (pip install uvloop): skipped")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(repeats):
        # Rotate the order each round, so a drift in the machine's load favours none.
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            run = _ingest_relay(
                bench,
                messages=messages,
                sessions=sessions,
                size=size,
                warmup=warmup,
                **variants[name],
            )
            runs[name].append(run)
            print(f"  what-if round {round_ + 1}/{repeats} {name}: {run['msg_per_s']:.0f} msg/s")
    base = median([r["msg_per_s"] for r in runs["baseline"]])
    summary: dict[str, Any] = {
        "parameters": {
            "messages": messages,
            "sessions": sessions,
            "size": size,
            "repeats": repeats,
        },
        "notes": notes,
    }
    for name, done in runs.items():
        rate = median([r["msg_per_s"] for r in done])
        summary[name] = {
            "msg_per_s": round(rate, 1),
            "vs_baseline": round(rate / base, 3),
            "relay_cpu_ms_per_msg": round(median([r["relay_cpu_ms_per_msg"] for r in done]), 3),
            "mariadb_cpu_ms_per_msg": round(median([r["mariadb_cpu_ms_per_msg"] for r in done]), 3),
            "runs": done,
        }
    return summary


def _relays_for_ingest(
    bench: Bench, name: str, *, loop: str = "asyncio", replicas: int = 1
) -> tuple[list[RelayProcess], str]:
    server = bench.mariadb()
    database = bench.new_database()
    relays: list[RelayProcess] = []
    try:
        for n in range(replicas):
            directory = bench.workdir(f"{name}-{n}")
            # delivery.enabled false: the relay holds what it accepts, like Postfix's hold.
            config = relay_config(server, database, directory)
            config["smtp"]["processes"] = bench.relay_processes
            relays.append(RelayProcess.start(config, directory, name, loop=loop))
    except BaseException:
        for relay in relays:
            relay.stop()
        raise
    return relays, database


def _ingest_relay(
    bench: Bench,
    *,
    messages: int,
    sessions: int,
    size: int,
    warmup: int,
    loop: str = "asyncio",
    replicas: int = 1,
) -> dict[str, Any]:
    server = bench.mariadb()
    relays, database = _relays_for_ingest(
        bench, f"ingest-{bench.next_run()}", loop=loop, replicas=replicas
    )
    ports = [relay.smtp_port for relay in relays]
    try:
        _warm(ports, warmup, sessions, size)
        before = count_messages(server, database)
        counters = server_counters(server)
        pids = {f"relay{n}": relay.pid for n, relay in enumerate(relays)}
        # A relay's tree: its extra ingest processes (smtp.processes) work for it too.
        meter = CpuMeter({"mariadb": server.process.pid}, trees=pids)
        meter.start()
        run = smtp_source(ports, messages=messages, sessions=sessions, size=size)
        cpu = meter.stop({"smtp_source": run.cpu_seconds})
        accepted = count_messages(server, database) - before
        per_message = counters_per_message(counters, server_counters(server), accepted)
        rss = max(rss_bytes(relay.pid) for relay in relays)
    finally:
        for relay in relays:
            relay.stop()
        drop_database(server, database)
    relay_cpu = sum(cpu[f"{name}_cpu_s"] for name in pids)
    return {
        "msg_per_s": round(accepted / run.seconds, 1),
        "seconds": round(run.seconds, 3),
        "accepted": accepted,
        "offered": messages,
        "smtp_source_exit": run.returncode,
        "smtp_source_errors": run.errors,
        "relay_rss_mib": mib(rss),
        "relay_cpu_ms_per_msg": round(1000 * relay_cpu / max(accepted, 1), 3),
        "mariadb_cpu_ms_per_msg": round(1000 * cpu["mariadb_cpu_s"] / max(accepted, 1), 3),
        "mariadb_per_message": per_message,
        **cpu,
    }


def _ingest_postfix(
    bench: Bench, *, messages: int, sessions: int, size: int, warmup: int
) -> dict[str, Any]:
    postfix = bench.postfix()
    postfix.clear()
    _warm(postfix.port, warmup, sessions, size)
    before = postfix.held()
    meter = CpuMeter({}, trees={"postfix": postfix.master_pid()})
    meter.start()
    run = smtp_source(postfix.port, messages=messages, sessions=sessions, size=size)
    cpu = meter.stop({"smtp_source": run.cpu_seconds})
    accepted = postfix.held() - before
    return {
        "msg_per_s": round(accepted / run.seconds, 1),
        "seconds": round(run.seconds, 3),
        "accepted": accepted,
        "offered": messages,
        "smtp_source_exit": run.returncode,
        "smtp_source_errors": run.errors,
        "postfix_cpu_ms_per_msg": round(1000 * cpu["postfix_cpu_s"] / max(accepted, 1), 3),
        **cpu,
    }


def _warm(ports: int | list[int], messages: int, sessions: int, size: int) -> None:
    if messages:
        run = smtp_source(ports, messages=messages, sessions=sessions, size=size)
        if run.returncode != 0:
            raise RuntimeError(f"warm-up failed ({run.returncode}): {run.errors}")


def _profile_ingest(
    bench: Bench, *, messages: int, sessions: int, size: int, warmup: int
) -> dict[str, Any]:
    server = bench.mariadb()
    relays, database = _relays_for_ingest(bench, "ingest-profiled")
    relay = relays[0]
    try:
        _warm(relay.smtp_port, warmup, sessions, size)
        profiler = Profiler(relay.pid, bench.artefacts / "profile-ingest.txt")
        time.sleep(0.5)  # py-spy attaches
        run = smtp_source(relay.smtp_port, messages=messages, sessions=sessions, size=size)
        summary = profiler.stop()
    finally:
        relay.stop()
        drop_database(server, database)
    summary["note"] = "extra run, not in the medians"
    summary["msg_per_s_while_sampled"] = round(messages / run.seconds, 1)
    return summary


# Latency: the paced client at half the relay's maximum, and Postfix at the same rate


def latency(
    bench: Bench,
    *,
    max_rate: float | None,
    seconds: float,
    connections: int,
    size: int,
    sessions: int,
) -> dict[str, Any]:
    server = bench.mariadb()
    if max_rate is None:
        max_rate = _ingest_relay(bench, messages=3000, sessions=sessions, size=size, warmup=300)[
            "msg_per_s"
        ]
    rate = max_rate / 2
    relays, database = _relays_for_ingest(bench, "latency")
    relay = relays[0]
    try:
        _warm(relay.smtp_port, 300, sessions, size)
        measured = asyncio.run(
            paced_load(
                relay.smtp_port, rate=rate, seconds=seconds, connections=connections, size=size
            )
        )
    finally:
        relay.stop()
        drop_database(server, database)
    postfix = bench.postfix()
    postfix.clear()
    _warm(postfix.port, 300, sessions, size)
    baseline = asyncio.run(
        paced_load(postfix.port, rate=rate, seconds=seconds, connections=connections, size=size)
    )
    relay_view = _latencies(measured)
    return {
        "parameters": {
            "max_rate_msg_per_s": round(max_rate, 1),
            "seconds": seconds,
            "connections": connections,
            "size": size,
        },
        "offered_msg_per_s": round(rate, 1),
        "relay": relay_view,
        "postfix_same_rate": _latencies(baseline),
        "target": f"relay P95 < {LATENCY_P95_TARGET_MS} ms at half the maximum rate",
        "target_met": relay_view.get("p95_ms", float("inf")) < LATENCY_P95_TARGET_MS
        and measured.failed == 0,
    }


def _latencies(result: PacedResult) -> dict[str, Any]:
    view: dict[str, Any] = {
        "sent": result.sent,
        "failed": result.failed,
        "errors": result.errors,
        "achieved_msg_per_s": round(result.sent / result.seconds, 1) if result.seconds else 0,
        "client_cpu_s": round(result.client_cpu_s, 2),
    }
    if result.latency_s:
        for share in (50, 95, 99):
            view[f"p{share}_ms"] = round(1000 * percentile(result.latency_s, share), 2)
            view[f"service_p{share}_ms"] = round(1000 * percentile(result.service_s, share), 2)
        view["max_ms"] = round(1000 * max(result.latency_s), 2)
    return view


# Drain: a backlog delivered to a local sink


def drain(
    bench: Bench,
    *,
    backlog: int,
    size: int,
    providers: list[str],
    delivery: dict[str, Any],
    repeats: int,
    sink_connections: int | None = None,
    loop: str = "asyncio",
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "parameters": {
            "loop": loop,
            "backlog": backlog,
            "size": size,
            "delivery": delivery or "defaults",
            "sink_connections": sink_connections or delivery.get("worker_count") or "default",
            "repeats": repeats,
        },
        "target": f">= {DRAIN_TARGET_MSG_S:.0f} msg/s",
    }
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in providers}
    for round_ in range(repeats):
        for kind in providers:
            run = _drain_once(
                bench,
                kind,
                backlog=backlog,
                size=size,
                delivery=delivery,
                sink_connections=sink_connections,
                loop=loop,
            )
            runs[kind].append(run)
            print(f"  drain round {round_ + 1}/{repeats} {kind}: {run['msg_per_s']:.0f} msg/s")
    for kind, done in runs.items():
        rate = median([r["msg_per_s"] for r in done])
        results[kind] = {
            "msg_per_s": round(rate, 1),
            "steady_10_90_msg_per_s": median(
                [r["steady_10_90_msg_per_s"] or r["msg_per_s"] for r in done]
            ),
            "relay_cpu_ms_per_msg": median([r["relay_cpu_ms_per_msg"] for r in done]),
            "mariadb_cpu_ms_per_msg": median([r["mariadb_cpu_ms_per_msg"] for r in done]),
            "mariadb_per_message": _median_counters(done),
            "runs": done,
        }
        if bench.wants_profile(rate < DRAIN_TARGET_MSG_S):
            results[kind]["profile"] = _drain_once(
                bench,
                kind,
                backlog=min(backlog, 10000),
                size=size,
                delivery=delivery,
                sink_connections=sink_connections,
                loop=loop,
                profile=True,
            )["profile"]
    results["target_met"] = all(
        results[kind]["msg_per_s"] >= DRAIN_TARGET_MSG_S for kind in providers
    )
    return results


def _provider(kind: str, sink: Sink, connections: int | None = None) -> dict[str, Any]:
    pool = {"max_connections": min(connections, 256)} if connections else {}
    if kind == "smtp":
        return {"type": "smtp", "host": "127.0.0.1", "port": sink.port, "tls": "none", **pool}
    return {
        "type": "mailgun",
        "domain": "bench.test",
        "api_key": "bench-not-a-real-key",
        "base_url": f"http://127.0.0.1:{sink.port}",
        **pool,
    }


def _drain_once(
    bench: Bench,
    kind: str,
    *,
    backlog: int,
    size: int,
    delivery: dict[str, Any],
    sink_connections: int | None = None,
    loop: str = "asyncio",
    profile: bool = False,
) -> dict[str, Any]:
    server = bench.mariadb()
    database = bench.new_database()
    name = f"drain-{kind}-{database}"
    directory = bench.workdir(name)
    config = relay_config(
        server, database, directory, delivery={"enabled": True, "providers": ["sink"], **delivery}
    )
    filled = time.monotonic()
    asyncio.run(_fill(config, backlog, size))
    fill_seconds = time.monotonic() - filled
    count_file = directory / "sink.count"
    sink = Sink.smtp() if kind == "smtp" else Sink.mailgun(count_file)
    # More workers only help if the provider lets as many sends run at once.
    workers = delivery.get("worker_count")
    config["providers"] = {"sink": _provider(kind, sink, sink_connections or workers)}
    if workers:
        config["delivery"]["provider_limits"] = {"sink": {"max_concurrency": workers}}
    relay = None
    try:
        relay = RelayProcess.start(config, directory, name, loop=loop)
        profiler = (
            Profiler(relay.pid, bench.artefacts / f"profile-drain-{kind}.txt") if profile else None
        )
        # The relay's tree: its extra delivery processes (delivery.processes) work for it too.
        meter = CpuMeter(
            {"mariadb": server.process.pid, "sink": sink.process.pid}, trees={"relay": relay.pid}
        )
        counters = server_counters(server)
        meter.start()
        progress = _watch_drain(server, database, backlog)
        cpu = meter.stop()
        delivered = progress["delivered_after_ready"]
        per_message = counters_per_message(counters, server_counters(server), delivered)
        rss = rss_bytes(relay.pid)
        summary = profiler.stop() if profiler else None
    finally:
        if relay is not None:
            relay.stop()
        sink.stop()
    left = {s: count_messages(server, database, s) for s in ("queued", "processing", "failed")}
    drop_database(server, database)
    result: dict[str, Any] = {
        **progress,
        "fill_seconds": round(fill_seconds, 1),
        "not_sent": left,
        "relay_rss_mib": mib(rss),
        "relay_cpu_ms_per_msg": round(1000 * cpu["relay_cpu_s"] / max(delivered, 1), 3),
        "mariadb_cpu_ms_per_msg": round(1000 * cpu["mariadb_cpu_s"] / max(delivered, 1), 3),
        "mariadb_per_message": per_message,
        **cpu,
    }
    if kind == "mailgun" and count_file.exists():
        result["sink_requests"] = int(count_file.read_text())
    if summary is not None:
        summary["note"] = f"extra run of {backlog} messages, not the measured one"
        summary["msg_per_s_while_sampled"] = progress["msg_per_s"]
        result["profile"] = summary
    return result


async def _fill(config: dict[str, Any], count: int, size: int, concurrency: int = 16) -> None:
    """Queue the backlog through the relay's own store, as ingest would have."""
    from relay.clock import utcnow
    from relay.config import Settings
    from relay.ids import new_queue_id
    from relay.queue import NewMessage, create_store

    settings = Settings(queue=config["queue"], smtp={"hostname": "relay.bench.test"})
    store = create_store(settings)
    await store.open()
    await store.migrate()
    content = (
        b"Received: from client.bench.test (localhost [127.0.0.1])\r\n"
        b"\tby relay.bench.test with ESMTP; backlog\r\n" + message(size)[: -len(b".\r\n")]
    )

    async def worker(first: int) -> None:
        for n in range(first, count, concurrency):
            await store.enqueue(
                NewMessage(
                    id=new_queue_id(),
                    workspace_id="default",
                    from_email=SENDER,
                    recipients=(RECIPIENT.replace("rcpt@", f"patient{n}@"),),
                    subject="appointment reminder",
                    content=content,
                    queued_at=utcnow(),
                )
            )

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        await store.close()


def _poll_interval(elapsed: float, delivered: int, remaining: int) -> float:
    """Seconds to the next count. Each count walks the index of the sent messages, up to
    the whole backlog, on the MariaDB being measured: five a second were a quarter of its
    CPU in a 100,000-message drain. So counts thin out as the run grows (1/20 of the time
    gone, at most 2 s), and come every 0.2 s again near the expected end, where the timing
    is read."""
    interval = min(2.0, elapsed / 20)
    if delivered > 0 and elapsed > 0:
        interval = min(interval, remaining / (delivered / elapsed) / 3)
    return max(0.2, interval)


def _watch_drain(server: MariaDB, database: str, backlog: int) -> dict[str, Any]:
    """Poll the queue until everything is sent or progress stops; rates from the marks."""
    started = time.monotonic()
    at_start = count_messages(server, database, "sent")
    marks: dict[str, float] = {}
    sent, last_progress, last_sent = at_start, started, at_start
    while sent < backlog:
        time.sleep(_poll_interval(time.monotonic() - started, sent - at_start, backlog - sent))
        sent = count_messages(server, database, "sent")
        now = time.monotonic()
        for share in (10, 90):
            if f"t{share}" not in marks and sent >= backlog * share / 100:
                marks[f"t{share}"] = now
        if sent > last_sent:
            last_progress, last_sent = now, sent
        elif now - last_progress > 60:
            break  # stuck: report what was delivered
    finished = time.monotonic()
    delivered = sent - at_start
    steady = None
    if "t10" in marks and "t90" in marks and marks["t90"] > marks["t10"]:
        steady = round(0.8 * backlog / (marks["t90"] - marks["t10"]), 1)
    return {
        # From readiness on: start-up (imports, migrations) is not delivery.
        "msg_per_s": round(delivered / (finished - started), 1),
        "steady_10_90_msg_per_s": steady,
        "seconds": round(finished - started, 2),
        "delivered": sent,
        "delivered_after_ready": delivered,
        "sent_before_ready": at_start,
        "complete": sent >= backlog,
    }


# Memory: RSS under a steady paced load, and over a soak


def memory(
    bench: Bench, *, rate: float, seconds: float, connections: int, size: int
) -> dict[str, Any]:
    server = bench.mariadb()
    database = bench.new_database()
    name = "memory"
    directory = bench.workdir(name)
    sink = Sink.smtp()
    config = relay_config(
        server,
        database,
        directory,
        delivery={"enabled": True, "providers": ["sink"]},
        providers={"sink": _provider("smtp", sink)},
    )
    relay = None
    samples: list[tuple[float, float]] = []
    try:
        relay = RelayProcess.start(config, directory, name)
        idle = rss_bytes(relay.pid)
        pid = relay.pid
        began = time.monotonic()

        async def sample() -> None:
            samples.append((time.monotonic() - began, rss_bytes(pid) / 2**20))

        load = asyncio.run(
            paced_load(
                relay.smtp_port,
                rate=rate,
                seconds=seconds,
                connections=connections,
                size=size,
                tick=sample,
            )
        )
        time.sleep(5)  # let delivery catch up and buffers settle
        after = rss_bytes(relay.pid)
        delivered = count_messages(server, database, "sent")
    finally:
        if relay is not None:
            relay.stop()
        sink.stop()
        drop_database(server, database)
    return _memory_summary(
        samples, load, idle=idle, after=after, delivered=delivered, rate=rate, seconds=seconds
    )


def _memory_summary(
    samples: list[tuple[float, float]],
    load: PacedResult,
    *,
    idle: int,
    after: int,
    delivered: int,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    # The first fifth (at least 10 s) is warm-up: pools fill, code paths are first taken.
    skip = max(10.0, seconds / 5)
    steady = [s for s in samples if s[0] >= skip] or samples
    values = [v for _, v in steady]
    window = max(1, len(values) // 10)
    growth = median(values[-window:]) - median(values[:window]) if values else 0.0
    steady_median = median(values) if values else 0.0
    peak = max(values) if values else 0.0
    grew = growth > max(2.0, 0.05 * steady_median)
    return {
        "parameters": {
            "offered_msg_per_s": rate,
            "seconds": seconds,
            "connections": load.connections,
            "warm_up_skipped_s": skip,
        },
        "achieved_msg_per_s": round(load.sent / load.seconds, 1) if load.seconds else 0,
        "sent": load.sent,
        "failed": load.failed,
        "errors": load.errors,
        "delivered": delivered,
        "p95_ms": round(1000 * percentile(load.latency_s, 95), 1) if load.latency_s else None,
        "rss_idle_mib": mib(idle),
        "rss_steady_median_mib": round(steady_median, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_after_mib": mib(after),
        "rss_growth_mib": round(growth, 1),
        "rss_slope_mib_per_min": round(slope_per_minute(steady), 2),
        "samples": [[round(t, 1), round(v, 1)] for t, v in samples],
        "target": f"RSS < {RSS_TARGET_MIB:.0f} MiB at {MEMORY_RATE_TARGET:.0f} msg/s,"
        " no growth over the soak (last tenth within max(2 MiB, 5%) of the first)",
        "target_met": peak < RSS_TARGET_MIB
        and not grew
        and load.sent / max(load.seconds, 1e-9) >= 0.95 * MEMORY_RATE_TARGET,
        "rss_target_met": peak < RSS_TARGET_MIB,
        "no_growth_met": not grew,
    }
