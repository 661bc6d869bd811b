"""`python -m bench.run [all|ingest|latency|drain|memory|operator|drain_cores|whatif]`.

Measure, then report.

Writes bench/results/<timestamp>.json (profiles next to it in <timestamp>/) and prints a
short table. BENCH_SCALE (default 0.1) scales the long parts towards the issue's full
sizes: the drain backlog is 100,000 x BENCH_SCALE messages and the memory soak
600 x BENCH_SCALE seconds (at least 60). Every size also has its own flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.measure import machine, versions
from bench.operator import OPERATOR_P95_TARGET_S, OPERATOR_RSS_TARGET_MIB, operator_benchmark

RESULTS = Path(__file__).parent / "results"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    scale = float(os.environ.get("BENCH_SCALE", "0.1"))
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=(
            "all",
            "ingest",
            "latency",
            "drain",
            "drain_cores",
            "memory",
            "operator",
            "whatif",
        ),
        help="all: the relay's four measurements and the operator's. Not in all:"
        " drain_cores, the drain with a delivery process per core and --cores-workers;"
        " whatif, uvloop and two replicas",
    )
    parser.add_argument("--messages", type=int, default=10000, help="ingest: per run")
    parser.add_argument("--sessions", type=int, default=20, help="ingest: smtp-source -s")
    parser.add_argument("--size", type=int, default=4096, help="message body bytes")
    parser.add_argument("--repeats", type=int, default=3, help="ingest rounds (medians)")
    parser.add_argument("--warmup", type=int, default=500, help="messages before each run")
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="ingest and latency: the relay's smtp.processes (default: one per core)",
    )
    parser.add_argument(
        "--max-rate",
        type=float,
        help="latency: the maximum ingest rate in msg/s, given instead of measured"
        " (the paced rate is half of it)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=30.0, help="latency: seconds of paced load"
    )
    parser.add_argument("--connections", type=int, default=20, help="paced client sessions")
    parser.add_argument(
        "--backlog",
        type=int,
        default=max(1000, int(100_000 * scale)),
        help="drain: messages queued before delivery starts",
    )
    parser.add_argument(
        "--drain-providers",
        default="smtp,mailgun",
        help="drain: comma-separated, of smtp (smtp-sink) and mailgun (the HTTP sink)",
    )
    parser.add_argument("--drain-repeats", type=int, default=3, help="drain rounds (medians)")
    parser.add_argument(
        "--workers",
        type=int,
        help="drain: delivery.worker_count, and the sink provider's connections and"
        " max_concurrency to match (default: the relay's defaults, 10 workers, 8 connections)",
    )
    parser.add_argument(
        "--sink-connections",
        type=int,
        help="drain: the sink provider's max_connections alone (default: --workers if given,"
        " else the provider's default, 8)",
    )
    parser.add_argument("--batch", type=int, help="drain: delivery.batch_size")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="drain: the relay's event loop (uvloop: a what-if, pip install uvloop)",
    )
    parser.add_argument(
        "--delivery-processes",
        type=int,
        default=1,
        help="drain: the relay's delivery.processes (drain_cores: one per core)",
    )
    parser.add_argument(
        "--cores-workers",
        type=int,
        default=40,
        help="drain_cores: delivery.worker_count, and the sink's connections and"
        " max_concurrency, all split between the processes",
    )
    parser.add_argument(
        "--memory-rate",
        type=float,
        default=scenarios.MEMORY_RATE_TARGET,
        help="memory: msg/s offered during the soak",
    )
    parser.add_argument("--soak", type=float, default=max(60.0, 600 * scale), help="seconds")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy extra runs: auto profiles where a target is missed",
    )
    parser.add_argument("--relays", type=int, default=200, help="operator: SmtpRelays per round")
    parser.add_argument("--operator-repeats", type=int, default=3, help="operator rounds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    # The relay's settings read RELAY_* (and RELAY_CONFIG): ours must be the only source,
    # for the relays started here and for the backlog queued from this process.
    for name in [n for n in os.environ if n.startswith("RELAY_")]:
        del os.environ[name]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    bench = scenarios.Bench(
        artefacts=RESULTS / stamp,
        profile=args.profile,
        keep=args.keep,
        relay_processes=args.processes,
    )
    report: dict[str, Any] = {
        "started": stamp,
        "command": " ".join(sys.argv),
        "bench_scale": os.environ.get("BENCH_SCALE", "0.1"),
        "machine": machine(),
        "versions": versions(),
    }
    began = time.monotonic()
    everything = ("ingest", "latency", "drain", "memory", "operator")
    wanted = everything if args.what == "all" else (args.what,)
    try:
        for what in wanted:
            print(f"{what} ...", flush=True)
            report[what] = _run(what, bench, args, report)
    finally:
        report["mariadb"] = bench.mariadb_settings
        report["disks"] = bench.disks()
        bench.close()
        report["duration_s"] = round(time.monotonic() - began, 1)
        report["load_average_at_end"] = os.getloadavg()
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{stamp}.json"
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(report))
    print(f"\nresults: {path}")
    return 0


def _run(
    what: str, bench: scenarios.Bench, args: argparse.Namespace, report: dict[str, Any]
) -> dict[str, Any]:
    if what == "operator":
        return operator_benchmark(
            root=bench.workdir("operator"),
            artefacts=bench.artefacts,
            relays=args.relays,
            repeats=args.operator_repeats,
            profile=bench.profile,
            keep=bench.keep,
        )
    if what in ("whatif", "ingest"):
        # The what-ifs are ingest runs under other settings: the same load.
        run = scenarios.whatif if what == "whatif" else scenarios.ingest
        return run(
            bench,
            messages=args.messages,
            sessions=args.sessions,
            size=args.size,
            repeats=args.repeats,
            warmup=args.warmup,
        )
    if what == "latency":
        max_rate = args.max_rate or report.get("ingest", {}).get("relay_msg_per_s")
        return scenarios.latency(
            bench,
            max_rate=max_rate,
            seconds=args.latency_seconds,
            connections=args.connections,
            size=args.size,
            sessions=args.sessions,
        )
    if what in ("drain", "drain_cores"):
        delivery: dict[str, Any] = {}
        sink_connections = args.sink_connections
        if what == "drain_cores":
            # The relay as docs/benchmarks.md recommends for a two-core drain.
            delivery["processes"] = os.cpu_count() or 1
            delivery["worker_count"] = args.cores_workers
            sink_connections = sink_connections or args.cores_workers
        else:
            if args.workers:
                delivery["worker_count"] = args.workers
            if args.delivery_processes > 1:
                delivery["processes"] = args.delivery_processes
        if args.batch:
            delivery["batch_size"] = args.batch
        return scenarios.drain(
            bench,
            backlog=args.backlog,
            size=args.size,
            providers=[p for p in args.drain_providers.split(",") if p],
            repeats=args.drain_repeats,
            delivery=delivery,
            sink_connections=sink_connections,
            loop=args.loop,
        )
    return scenarios.memory(
        bench,
        rate=args.memory_rate,
        seconds=args.soak,
        connections=2 * args.connections,
        size=args.size,
    )


def _others_shares(node: Any) -> list[float]:
    """Every run's share of the machine's CPU that was not ours (other engineers' tests)."""
    if isinstance(node, dict):
        found = [float(node["others_share"])] if "others_share" in node else []
        return found + [s for value in node.values() for s in _others_shares(value)]
    if isinstance(node, list):
        return [s for value in node for s in _others_shares(value)]
    return []


def _mark(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "MISSED")


def table(report: dict[str, Any]) -> str:
    rows = [("measure", "relay", "Postfix / note", "target")]
    if "ingest" in report:
        i = report["ingest"]
        rows.append(
            (
                "ingest msg/s (median)",
                f"{i['relay_msg_per_s']:.0f}",
                f"{i['postfix_msg_per_s']:.0f}",
                "",
            )
        )
        rows.append(
            (
                "ingest ratio relay/Postfix",
                f"{i['median_ratio']:.2f}",
                f"rounds {i['ratio_per_round']}",
                _mark(i["target_met"]),
            )
        )
        rows.append(
            (
                "CPU ms per message",
                f"{i['relay_cpu_ms_per_msg']:.2f} + MariaDB {i['mariadb_cpu_ms_per_msg']:.2f}",
                f"{i['postfix_cpu_ms_per_msg']:.2f}",
                "",
            )
        )
    if "latency" in report:
        lat = report["latency"]
        r, p = lat["relay"], lat["postfix_same_rate"]
        rows.append(
            (
                f"latency ms at {lat['offered_msg_per_s']:.0f} msg/s P50/P95/P99",
                f"{r.get('p50_ms')}/{r.get('p95_ms')}/{r.get('p99_ms')}",
                f"{p.get('p50_ms')}/{p.get('p95_ms')}/{p.get('p99_ms')}",
                _mark(lat["target_met"]),
            )
        )
    for name in ("drain", "drain_cores"):
        if name not in report:
            continue
        d = report[name]
        setup = d["parameters"]["delivery"]
        label = (
            "defaults"
            if setup == "defaults"
            else f"{setup.get('processes', 1)} proc, {setup.get('worker_count', 10)} workers"
        )
        for kind in ("smtp", "mailgun"):
            if kind in d:
                rows.append(
                    (
                        f"drain {kind} msg/s ({d['parameters']['backlog']}, {label})",
                        f"{d[kind]['msg_per_s']:.0f}",
                        f"steady {d[kind]['steady_10_90_msg_per_s']}",
                        _mark(d[kind]["msg_per_s"] >= scenarios.DRAIN_TARGET_MSG_S),
                    )
                )
    if "memory" in report:
        m = report["memory"]
        rows.append(
            (
                f"RSS MiB at {m['parameters']['offered_msg_per_s']:.0f} msg/s offered",
                f"{m['rss_steady_median_mib']} (peak {m['rss_peak_mib']})",
                f"achieved {m['achieved_msg_per_s']} msg/s",
                _mark(m["rss_target_met"]),
            )
        )
        rows.append(
            (
                f"sustains {scenarios.MEMORY_RATE_TARGET:.0f} msg/s with delivery",
                f"{m['achieved_msg_per_s']} in",
                f"{m['delivered']} delivered",
                _mark(m["achieved_msg_per_s"] >= 0.95 * scenarios.MEMORY_RATE_TARGET),
            )
        )
        rows.append(
            (
                f"RSS growth over {m['parameters']['seconds']:.0f} s soak",
                f"{m['rss_growth_mib']} MiB",
                f"{m['rss_slope_mib_per_min']} MiB/min",
                _mark(m["no_growth_met"]),
            )
        )
    if report.get("operator"):
        o = report["operator"]
        rows.append(
            (
                f"operator: SmtpRelay to children, {o['parameters']['relays']} relays, P50/P95",
                f"{o['p50_s']} / {o['p95_s']} s",
                f"target P95 < {OPERATOR_P95_TARGET_S:.0f} s",
                _mark(o["p95_target_met"]),
            )
        )
        rows.append(
            (
                "operator RSS peak",
                f"{o['rss_peak_mib']} MiB",
                f"idle {o['rss_idle_mib']} MiB, target < {OPERATOR_RSS_TARGET_MIB:.0f}",
                _mark(o["rss_target_met"]),
            )
        )
        paced = o.get("paced") or {}
        if "p95_s" in paced:
            rows.append(
                (
                    f"operator paced, {paced['paced_per_s']:g} relays/s, P50/P95",
                    f"{paced['p50_s']} / {paced['p95_s']} s",
                    "not the headline, not in the medians",
                    "",
                )
            )
        floor = o.get("floor") or {}
        if "p95_s" in floor:
            rows.append(
                (
                    "operator floor: the four applies alone, P50/P95",
                    f"{floor['p50_s']} / {floor['p95_s']} s",
                    "reference applier, one round: the control plane's part",
                    "",
                )
            )
        settled = o.get("paced", {}).get("settled")
        if settled:
            rows.append(
                (
                    f"operator settled: requests per relay in {settled['window_s']:.0f} s",
                    f"{settled['requests_per_relay']['total']}",
                    # The peering heartbeat is a fixed number of requests, whatever the
                    # relays: per relay, it dominates a small --relays.
                    f"peering {settled['requests_per_relay'].get('PATCH clusterkopfpeerings', 0)};"
                    f" API server {settled['apiserver_cpu_s']} s CPU, one resync pass",
                    "",
                )
            )
    if "whatif" in report:
        w = report["whatif"]
        for name in ("baseline", "uvloop", "two_replicas"):
            if name in w:
                rows.append(
                    (
                        f"what-if ingest {name} msg/s",
                        f"{w[name]['msg_per_s']:.0f}",
                        f"x{w[name]['vs_baseline']:.2f} of baseline",
                        "",
                    )
                )
    shares = sorted(_others_shares(report))
    if shares:
        rows.append(
            (
                "machine used by others (median, max)",
                f"{100 * shares[len(shares) // 2]:.0f}%",
                f"{100 * shares[-1]:.0f}%",
                "busy" if shares[len(shares) // 2] > 0.1 else "quiet",
            )
        )
    widths = [max(len(str(row[c])) for row in rows) for c in range(4)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    )


if __name__ == "__main__":
    sys.exit(main())
