"""The operator's figures of issue 9: from applying an SmtpRelay to all its children existing.

A control plane of the run's own (hack/cluster/up.sh under its own name and directory, so
kwokctl gives it its own ports), the chart installed by helm with its Deployment scaled to
0, and the operator run as a local process under the chart's ServiceAccount, as the tests
do (tests/operator/cluster.py). Then SmtpRelays without spec.strategy are created one
after the other as fast as the API server takes them, and watches on the namespace note
when each relay's ConfigMap, Deployment, Service and PodDisruptionBudget first appear
(handlers._apply_children). A relay's time runs from just before its create call to the
last of its four children; the operator's RSS is sampled every 0.2 s throughout, and the
API requests the operator sends are counted (`counted_operator`).

The rounds are a burst, the issue's figure. One more round, labelled `paced` and kept out
of the medians, creates the relays at a steady `PACED_PER_S` a second, as a GitOps sync
applying a directory might: the time one relay takes when the control plane is not
saturated by the other 199. A last round, `floor`, repeats the burst with
`bench.floor_operator` in the operator's place, which only applies each relay's four
children: the part of the figure that belongs to the control plane on this machine.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from bench.measure import CpuMeter, Profiler, median, mib, percentile, rss_bytes
from tests.operator.cluster import (
    CHART,
    EXAMPLES,
    HACK,
    OPERATOR_NAMESPACE,
    RELEASE,
    REPO,
    Cluster,
    OperatorProcess,
    clean_environment,
    missing_tools,
    tool_path,
)

OPERATOR_P95_TARGET_S = 1.0
OPERATOR_RSS_TARGET_MIB = 200.0
# What a relay without spec.strategy gets (handlers._apply_children): kind -> name suffix.
CHILDREN = {"ConfigMap": "-config", "Deployment": "", "Service": "", "PodDisruptionBudget": ""}
GROUP, VERSION, PLURAL = "relay.smtp-relay.dev", "v1alpha1", "smtprelays"
# The paced round: relays created per second.
PACED_PER_S = 4.0
REQUEST_COUNTS_ENV = "BENCH_OPERATOR_REQUEST_COUNTS"


def request_key(method: str, url: str) -> str:
    """`PATCH deployments`, `PATCH smtprelays/status`, `WATCH smtprelays`: what a request
    was, without namespaces and names."""
    parsed = re.sub(r"^[a-z]+://[^/]+", "", url)
    route, _, query = parsed.partition("?")
    parts = route.strip("/").split("/")
    # /api/v1/... or /apis/<group>/<version>/...
    parts = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if parts[:1] == ["namespaces"] and len(parts) > 2:
        parts = parts[2:]
    resource = parts[0] if parts else "discovery"
    if len(parts) > 2:
        resource += "/" + parts[2]
    verb = "WATCH" if re.search(r"(^|&)watch=(true|1)", query) else method.upper()
    return f"{verb} {resource}"


def count_requests() -> None:
    """Count every API request this process sends from now on, by verb and resource.

    Both of the operator's HTTP clients are wrapped: urllib3 under the official client (the
    handlers' reads and writes) and aiohttp under kopf (watches, its progress annotations,
    peering, Events of its own). SIGUSR1 writes the counts so far as JSON to
    $BENCH_OPERATOR_REQUEST_COUNTS. A dict increment per request: nothing measurable
    next to the request itself.
    """
    import aiohttp
    import urllib3

    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def count(method: str, url: Any) -> None:
        with lock:
            counts[request_key(method, str(url))] += 1

    pool_open = urllib3.PoolManager.urlopen
    session_request = aiohttp.ClientSession._request

    def urlopen(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        count(method, url)
        return pool_open(self, method, url, *args, **kwargs)

    async def request(self: Any, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:
        count(method, url)
        return await session_request(self, method, url, *args, **kwargs)

    def write(*_: object) -> None:
        target = Path(os.environ[REQUEST_COUNTS_ENV])
        with lock:
            text = json.dumps(dict(counts))
        partial = target.with_suffix(".partial")
        partial.write_text(text)
        partial.replace(target)

    urllib3.PoolManager.urlopen = urlopen  # type: ignore[method-assign]
    aiohttp.ClientSession._request = request  # type: ignore[method-assign,assignment]
    signal.signal(signal.SIGUSR1, write)


def counted_operator() -> None:
    """`python -m relay_operator run`, with every API request it sends counted."""
    from relay_operator.cli import main

    count_requests()
    sys.exit(main(["run"]))


def request_counts(operator: OperatorProcess, target: Path) -> dict[str, int]:
    """The counts so far of an operator started by `counted_operator`."""
    assert operator.process is not None
    before = target.stat().st_mtime_ns if target.exists() else 0
    operator.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if target.exists() and target.stat().st_mtime_ns != before:
            counts: dict[str, int] = json.loads(target.read_text())
            return counts
        time.sleep(0.02)
    raise RuntimeError(f"the operator wrote no request counts to {target}")


def per_relay(before: Mapping[str, int], after: Mapping[str, int], relays: int) -> dict[str, float]:
    """Requests per relay between two counts, by kind; watches are streams, left out."""
    spent = {k: after[k] - before.get(k, 0) for k in after if not k.startswith("WATCH")}
    result = {k: round(v / relays, 2) for k, v in sorted(spent.items()) if v}
    result["total"] = round(sum(spent.values()) / relays, 2)
    return result


def control_plane(directory: Path) -> tuple[Cluster, Callable[[], None]]:
    """A private control plane with the chart installed; and the function that removes it."""
    path = tool_path()
    missing = missing_tools(path)
    if missing:
        # Building them takes minutes and may be under way elsewhere: never started here.
        raise RuntimeError(
            f"the test control plane is not built (missing: {', '.join(missing)}):"
            " run hack/cluster/build.sh first"
        )
    name = f"bench-{directory.name[-8:].lower().replace('_', '-')}"
    env = {**clean_environment(), "RELAY_CLUSTER_NAME": name, "RELAY_CLUSTER_DIR": str(directory)}

    def down() -> None:
        subprocess.run(  # noqa: S603 - our own script
            [str(HACK / "down.sh")], env=env, capture_output=True, text=True, timeout=120
        )

    up = subprocess.run(  # noqa: S603 - our own script
        [str(HACK / "up.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    if up.returncode != 0:
        down()
        raise RuntimeError(f"hack/cluster/up.sh failed:\n{up.stderr[-3000:]}")
    cluster = Cluster(directory, name, path, Path(up.stdout.strip().splitlines()[-1]))
    try:
        cluster.run(
            *("helm", "install", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE),
            *("--create-namespace", "--set", "replicaCount=0"),
        )
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    except BaseException:
        down()
        raise
    return cluster, down


class ChildWatch:
    """Watches on one namespace; the monotonic time each child was first seen, by kind."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        from kubernetes import client, config

        self.api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        self.namespace = namespace
        self.seen: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        core, apps, policy = (
            client.CoreV1Api(self.api),
            client.AppsV1Api(self.api),
            client.PolicyV1Api(self.api),
        )
        lists = {
            "ConfigMap": core.list_namespaced_config_map,
            "Deployment": apps.list_namespaced_deployment,
            "Service": core.list_namespaced_service,
            "PodDisruptionBudget": policy.list_namespaced_pod_disruption_budget,
        }
        self._ready = threading.Barrier(len(lists) + 1)
        self._threads = [
            threading.Thread(target=self._watch, args=(kind, fn), daemon=True)
            for kind, fn in lists.items()
        ]

    def __enter__(self) -> ChildWatch:
        for thread in self._threads:
            thread.start()
        self._ready.wait(timeout=60)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self.api.close()

    def _watch(self, kind: str, list_fn: Callable[..., Any]) -> None:
        from kubernetes import watch

        listed = list_fn(self.namespace)
        version = listed.metadata.resource_version
        self._ready.wait(timeout=60)
        while not self._stop.is_set():
            stream = watch.Watch()
            # Short server-side timeouts, so that the thread notices the end of the run.
            for event in stream.stream(
                list_fn, self.namespace, resource_version=version, timeout_seconds=2
            ):
                now = time.monotonic()
                obj = event["object"]
                version = obj.metadata.resource_version
                if event["type"] == "ADDED":
                    self.seen.setdefault((kind, obj.metadata.name), now)
                if self._stop.is_set():
                    stream.stop()

    def done_at(self, relay: str) -> float | None:
        times = [self.seen.get((kind, relay + suffix)) for kind, suffix in CHILDREN.items()]
        return None if None in times else max(t for t in times if t is not None)


def smtp_relay(name: str) -> dict[str, Any]:
    """The smallest relay (examples/smtprelay-embedded.yaml), without spec.strategy."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SmtpRelay",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "providers": ["outbox"],
            "queue": {"backend": "sqlite"},
            "smtp": {"trustedNetworks": ["10.0.0.0/8"]},
        },
    }


# The control plane's processes, by the component in their command line.
_COMPONENTS = {
    "kube-apiserver": "apiserver",
    "etcd": "etcd",
    "kube-controller-manager": "controller_manager",
    "kube-scheduler": "scheduler",
    "kwok-controller": "kwok",
}


def control_plane_pids(directory: Path) -> dict[str, int]:
    """kwokctl's processes for the cluster under `directory`: their CPU is measured too,
    so that the report says how much of the machine the control plane took."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0] or str(directory).encode() not in b" ".join(argv):
            continue
        binary = Path(argv[0].decode(errors="replace")).name
        if binary in _COMPONENTS:
            found[_COMPONENTS[binary]] = int(entry.name)
    return found


@contextlib.contextmanager
def _sampling_rss(pid: int, samples: list[float]) -> Iterator[None]:
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                samples.append(rss_bytes(pid) / 2**20)
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


WARM_UP = "warm-up"


def _warm_up(api: Any, namespace: str, *, provider_status: bool, timeout: float = 60) -> None:
    """One relay first, outside the measurement, until its children exist.

    The operator answers its liveness probe before its watches stream. On a fresh control
    plane the API server refuses watches of a just-installed CRD for a moment (429,
    "storage is (re)initializing") and kopf tries again a second later: relays created
    meanwhile waited for that second and the operator's start, not for their
    reconcile. Without this, a round whose creates went fast measured mostly that (a
    P95 of 5.1 s where the rounds either side had 1.6 s).
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    # First the provider's status: the operator has handled it, and with it listed the
    # relays that use it (none yet). So the warm-up relay can only reach the operator
    # through the SmtpRelay watch, which is what has to be streaming. (The floor
    # round's applier writes no status and has no other way to a relay.)
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    while provider_status and not custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "relayproviders", "outbox"
    ).get("status"):
        if time.monotonic() > deadline:
            raise RuntimeError("the operator never wrote the RelayProvider's status")
        time.sleep(0.1)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, smtp_relay(WARM_UP))
    core, apps, policy = client.CoreV1Api(api), client.AppsV1Api(api), client.PolicyV1Api(api)
    reads = (
        lambda: core.read_namespaced_config_map(WARM_UP + "-config", namespace),
        lambda: apps.read_namespaced_deployment(WARM_UP, namespace),
        lambda: core.read_namespaced_service(WARM_UP, namespace),
        lambda: policy.read_namespaced_pod_disruption_budget(WARM_UP, namespace),
    )
    for read in reads:
        while True:
            try:
                read()
                break
            except ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)


def _round(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    relays: int,
    timeout: float,
    *,
    counts: Path,
    per_s: float | None = None,
    floor: bool = False,
) -> dict[str, Any]:
    """Create `relays` SmtpRelays in a new namespace; when each one's children appeared.

    As fast as the API server takes them, or `per_s` a second (relay n due at n / per_s).
    """
    from kubernetes import client, config

    cluster.kubectl("create", "namespace", namespace)
    cluster.apply(namespace, EXAMPLES / "relayprovider-outbox.yaml")
    assert operator.process is not None
    pid = operator.process.pid
    rss: list[float] = []
    meter = CpuMeter({"operator": pid, **control_plane_pids(cluster.directory)})
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    custom = client.CustomObjectsApi(api)
    warm_up_began = time.monotonic()
    _warm_up(api, namespace, provider_status=not floor)
    warm_up_s = time.monotonic() - warm_up_began
    applied: dict[str, float] = {}
    with ChildWatch(cluster, namespace) as watch, _sampling_rss(pid, rss):
        rss_before = rss_bytes(pid) / 2**20
        requests_before = request_counts(operator, counts)
        meter.start()
        began = time.monotonic()
        for n in range(relays):
            if per_s:
                time.sleep(max(0.0, began + n / per_s - time.monotonic()))
            name = f"relay-{n:03d}"
            applied[name] = time.monotonic()
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, smtp_relay(name)
            )
        created_s = time.monotonic() - began
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(watch.done_at(name) is not None for name in applied):
                break
            time.sleep(0.1)
        cpu = meter.stop()
        requests = per_relay(requests_before, request_counts(operator, counts), relays)
        done = {name: watch.done_at(name) for name in applied}
    api.close()
    latencies = [at - applied[name] for name, at in done.items() if at is not None]
    finished = [at for at in done.values() if at is not None]
    result: dict[str, Any] = {
        "relays": relays,
        "complete": len(latencies),
        # From the wait for the provider's status until the children of the relay
        # `warm-up` existed; not in any other figure.
        "warm_up_s": round(warm_up_s, 2),
        "create_calls_s": round(created_s, 2),
        "all_children_after_s": round(max(finished) - began, 2) if finished else None,
        "rss_before_mib": round(rss_before, 1),
        "rss_peak_mib": round(max(rss), 1) if rss else None,
        "rss_after_mib": mib(rss_bytes(pid)),
        "operator_cpu_ms_per_relay": round(1000 * cpu["operator_cpu_s"] / relays, 2),
        # From the first create until the last relay's children existed (or the timeout).
        "operator_requests_per_relay": requests,
        **cpu,
    }
    if per_s:
        result["paced_per_s"] = per_s
    if latencies:
        for share in (50, 95, 99):
            result[f"p{share}_s"] = round(percentile(latencies, share), 3)
        result["max_s"] = round(max(latencies), 3)
    return result


def operator_benchmark(
    *, root: Path, artefacts: Path, relays: int, repeats: int, profile: str, keep: bool
) -> dict[str, Any]:
    """Rounds of `relays` SmtpRelays, each on a fresh control plane and operator.

    Fresh, because an operator that already runs the previous round's relays reconciles
    them too (resync, Deployment events as kwok makes their pods ready): a second round on
    the same operator measured that load, not the time for 200 new relays.
    """
    rounds = [
        _fresh_round(root / f"round-{n + 1}", artefacts, relays, n + 1, repeats)
        for n in range(repeats)
    ]
    paced = _fresh_round(root / "paced", artefacts, relays, 0, 0, per_s=PACED_PER_S)
    floor = _fresh_round(root / "floor", artefacts, relays, 0, 0, floor=True)
    finished = [r for r in rounds if "p95_s" in r]
    p95 = median([r["p95_s"] for r in finished]) if finished else None
    peak = max((r["rss_peak_mib"] or 0) for r in rounds) if rounds else None
    complete = all(r["complete"] == relays for r in rounds)
    summary: dict[str, Any] = {
        "parameters": {"relays": relays, "repeats": repeats, "timeout_s": ROUND_TIMEOUT_S},
        "rss_idle_mib": median([r["rss_idle_mib"] for r in rounds]),
        "p50_s": median([r["p50_s"] for r in finished]) if finished else None,
        "p95_s": p95,
        "rss_peak_mib": peak,
        "operator_cpu_ms_per_relay": median([r["operator_cpu_ms_per_relay"] for r in rounds]),
        "operator_requests_per_relay": median(
            [r["operator_requests_per_relay"]["total"] for r in rounds]
        ),
        "others_share": median([r["others_share"] for r in rounds]),
        "target": f"P95 < {OPERATOR_P95_TARGET_S:.0f} s over {relays} SmtpRelays,"
        f" operator RSS < {OPERATOR_RSS_TARGET_MIB:.0f} MiB",
        "p95_target_met": complete and p95 is not None and p95 < OPERATOR_P95_TARGET_S,
        "rss_target_met": peak is not None and peak < OPERATOR_RSS_TARGET_MIB,
        "rounds": rounds,
        "paced": {**paced, "note": f"{PACED_PER_S:g} relays/s, not the headline, not in medians"},
        "floor": {
            **floor,
            "note": "bench.floor_operator: the same burst, only the four applies of each relay;"
            " what the control plane allows any operator",
        },
    }
    summary["target_met"] = summary["p95_target_met"] and summary["rss_target_met"]
    if profile == "always" or (profile == "auto" and not summary["target_met"]):
        extra = _fresh_round(root / "profiled", artefacts, relays, 0, 0, profiled=True)
        summary["profile"] = {
            **extra.pop("profile"),
            "note": "extra round, not in the medians",
            "p95_s_while_sampled": extra.get("p95_s"),
        }
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return summary


ROUND_TIMEOUT_S = 180.0
# Longer than one resync period (60 s, the chart's default) and its pass over the relays.
SETTLED_WINDOW_S = 75.0


def _settled(
    cluster: Cluster, operator: OperatorProcess, relays: int, *, counts: Path
) -> dict[str, Any]:
    """What the operator asks of the API server once its relays stand: requests per relay
    over a window holding one resync pass, and the CPU that took."""
    assert operator.process is not None
    meter = CpuMeter({"operator": operator.process.pid, **control_plane_pids(cluster.directory)})
    before = request_counts(operator, counts)
    meter.start()
    time.sleep(SETTLED_WINDOW_S)
    cpu = meter.stop()
    return {
        "window_s": SETTLED_WINDOW_S,
        "requests_per_relay": per_relay(before, request_counts(operator, counts), relays),
        **{f"{name}_cpu_s": cpu.get(f"{name}_cpu_s") for name in ("operator", "apiserver", "etcd")},
        "others_share": cpu["others_share"],
    }


def _fresh_round(
    directory: Path,
    artefacts: Path,
    relays: int,
    n: int,
    repeats: int,
    *,
    profiled: bool = False,
    per_s: float | None = None,
    floor: bool = False,
) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cluster, down = control_plane(directory)
    operator = OperatorProcess(
        cluster,
        cluster.token_kubeconfig(RELEASE, OPERATOR_NAMESPACE, directory / "operator.kubeconfig"),
        directory,
        # The chart's defaults, not the tests' short periods.
        env={
            "RELAY_OPERATOR_RESYNC_INTERVAL_S": "60",
            "RELAY_OPERATOR_LOG_FORMAT": "json",
            REQUEST_COUNTS_ENV: str(directory / "requests.json"),
            # The operator runs in its own directory: bench/ must be importable there.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
        command=[sys.executable, "-m", "bench.floor_operator"]
        if floor
        else [sys.executable, "-c", "from bench.operator import counted_operator as c; c()"],
    )
    try:
        operator.start()
        assert operator.process is not None
        rss_idle = mib(rss_bytes(operator.process.pid))
        profiler = None
        if profiled:
            profiler = Profiler(operator.process.pid, artefacts / "profile-operator.txt")
            time.sleep(0.5)  # py-spy attaches
        result = _round(
            cluster,
            operator,
            "bench",
            relays,
            timeout=ROUND_TIMEOUT_S,
            counts=directory / "requests.json",
            per_s=per_s,
            floor=floor,
        )
        if profiler is not None:
            result["profile"] = profiler.stop()
        if per_s:
            result["settled"] = _settled(
                cluster, operator, relays, counts=directory / "requests.json"
            )
        result["rss_idle_mib"] = rss_idle
        result["round_s"] = round(time.monotonic() - started, 1)
    finally:
        operator.stop()
        name = "profiled" if profiled else "paced" if per_s else "floor" if floor else f"round-{n}"
        if operator.log.exists():
            shutil.copy(operator.log, artefacts / f"operator-{name}.log")
        down()
    if not profiled:
        which = (
            f"paced round, {per_s:g}/s"
            if per_s
            else "floor round (the four applies alone)"
            if floor
            else f"round {n}/{repeats}"
        )
        print(
            f"  operator {which}: P50/P95 {result.get('p50_s')}/{result.get('p95_s')} s,"
            f" {result['complete']}/{relays} complete, RSS peak {result['rss_peak_mib']} MiB,"
            f" {result['operator_requests_per_relay']['total']} requests per relay,"
            f" others {result['others_share']:.0%}",
            flush=True,
        )
    return result
