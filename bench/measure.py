"""What a run records besides its rate: CPU time per process, RSS, the machine, profiles.

CPU time comes from /proc, so it is what each process really used while other engineers'
tests ran on the same two cores; the machine's busy time minus ours is their share.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.servers import MIB, VENV_BIN

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name is in parentheses and may hold spaces: split after its end.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, *, waited_children: bool = False) -> float:
    """utime + stime of a process (and of its children it has waited for)."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the name: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based.
    ticks = int(fields[11]) + int(fields[12])
    if waited_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def tree_cpu_seconds(pid: int) -> float:
    """A daemon and its worker processes: Postfix's master, smtpd, cleanup and the rest.

    Workers that exited were reaped by the master and are in its children's time; the
    ones still running are added one by one.
    """
    total = cpu_seconds(pid, waited_children=True)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class CpuMeter:
    """CPU seconds used by named processes, and by the whole machine, over one run."""

    def __init__(self, pids: Mapping[str, int], trees: Mapping[str, int] | None = None) -> None:
        self.pids = dict(pids)
        self.trees = dict(trees or {})
        self._start: dict[str, float] = {}
        self._machine = (0, 0)
        self._wall = 0.0

    def _read(self) -> dict[str, float]:
        read = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        read.update({name: tree_cpu_seconds(pid) for name, pid in self.trees.items()})
        return read

    def start(self) -> None:
        self._start = self._read()
        self._machine = machine_ticks()
        self._wall = time.monotonic()

    def stop(self, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """CPU seconds per process; `extra` adds processes measured elsewhere (wait4)."""
        end = self._read()
        busy = machine_ticks()[0]
        wall = time.monotonic() - self._wall
        spent = {name: end[name] - self._start[name] for name in end}
        spent.update(extra or {})
        used = {f"{name}_cpu_s": round(value, 2) for name, value in spent.items()}
        machine_busy = (busy - self._machine[0]) / _TICK
        used["machine_busy_cpu_s"] = round(machine_busy, 2)
        used["machine_capacity_cpu_s"] = round(wall * (os.cpu_count() or 1), 2)
        # Not ours: other engineers' tests, kernel threads (disk writeback, softirqs).
        # /proc's tick counts are read at slightly different moments: a quiet machine can
        # come out a few hundredths below zero, which is zero.
        used["others_cpu_s"] = round(max(0.0, machine_busy - sum(spent.values())), 2)
        capacity = used["machine_capacity_cpu_s"]
        share = used["others_cpu_s"] / capacity if capacity else 0.0
        used["others_share"] = round(share, 3)
        return used


# Statistics


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (share in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, round(share / 100 * len(ordered) + 0.4999))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def slope_per_minute(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples, per minute."""
    if len(samples) < 2:
        return 0.0
    xs = [s[0] for s in samples]
    ys = [s[1] for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else 60 * sum((x - mx) * (y - my) for x, y in samples) / den


def mib(value: float) -> float:
    return round(value / MIB, 1)


# The machine


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model[1].strip() if model else "unknown",
        "cpu_mhz": _first(r"^cpu MHz\s*:\s*(.+)$", cpuinfo),
        "avx512": bool(flags and "avx512f" in flags[1].split()),
        "memory_gib": round(int(mem[1]) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def _first(pattern: str, text: str) -> str | None:
    found = re.search(pattern, text, re.M)
    return found[1].strip() if found else None


def versions() -> dict[str, str]:
    def run(*argv: str) -> str:
        try:
            # Fixed commands of the installed packages; no input reaches them.
            out = subprocess.run(  # noqa: S603
                argv, capture_output=True, text=True, check=False, timeout=30
            )
        except OSError as exc:
            return f"unavailable: {exc}"
        return (out.stdout or out.stderr).strip()

    return {
        # -d: the compiled-in value. Without it postconf reads /etc/postfix/main.cf, which
        # the bench never uses and a machine with Postfix installed may not have.
        "postfix": run("postconf", "-d", "-h", "mail_version"),
        "mariadb": run("mariadbd", "--version"),
        "git_commit": run("git", "rev-parse", "HEAD"),
        # Other engineers edit relay/ while we measure: say which tree was measured.
        "git_uncommitted_files": str(len(run("git", "status", "--porcelain").splitlines())),
    }


def disk_of(path: Path) -> str:
    """The block device holding path, to show the relay's and Postfix's queues share it."""
    device = os.stat(path).st_dev
    return f"{os.major(device)}:{os.minor(device)}"


# Profiles (py-spy)


class Profiler:
    """py-spy sampling one process until stopped; its collapsed stacks, summarised."""

    def __init__(self, pid: int, output: Path, rate: int = 100) -> None:
        self.output = output
        self.process: subprocess.Popen[bytes] | None = None
        if not (VENV_BIN / "py-spy").exists():
            return  # stop() says how to get it
        self.process = subprocess.Popen(  # noqa: S603 - our own pid and paths
            [
                str(VENV_BIN / "py-spy"),
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                # Sample without pausing the relay, so it runs at its normal speed.
                "--nonblocking",
                # The relay's extra ingest processes (smtp.processes) too.
                "--subprocesses",
                "--output",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> dict[str, Any]:
        if self.process is None:
            return {"error": "py-spy is not installed in the venv: .venv/bin/pip install py-spy"}
        # py-spy writes its file when interrupted, as after Ctrl-C.
        self.process.send_signal(signal.SIGINT)
        _, err = self.process.communicate(timeout=60)
        if not self.output.exists():
            return {"error": err.decode(errors="replace")[-1000:]}
        return summarise(self.output)


# Where time goes, by the library or relay module a frame belongs to.
_AREAS = (
    ("aiosmtpd", "aiosmtpd (SMTP protocol)"),
    ("aiomysql", "aiomysql/PyMySQL (database driver)"),
    ("pymysql", "aiomysql/PyMySQL (database driver)"),
    ("aiosmtplib", "aiosmtplib (smarthost client)"),
    ("httpx", "httpx/httpcore (HTTP client)"),
    ("httpcore", "httpx/httpcore (HTTP client)"),
    ("h11", "httpx/httpcore (HTTP client)"),
    ("anyio", "httpx/httpcore (HTTP client)"),
    # A failed import is not cached: httpcore retries `import sniffio` on every request.
    ("importlib", "importlib (imports at run time)"),
    ("relay/ingest", "relay.ingest"),
    ("relay/queue", "relay.queue"),
    ("relay/delivery", "relay.delivery"),
    ("relay/logs", "relay.logs + logging"),
    ("logging/", "relay.logs + logging"),
    ("json/", "json"),
    ("email/", "email (stdlib parser)"),
    ("asyncio/", "asyncio event loop"),
    ("selectors", "asyncio event loop"),
    ("prometheus_client", "prometheus_client"),
    ("pydantic", "pydantic"),
    ("uvicorn", "uvicorn/HTTP API"),
)


def _area(frame: str) -> str:
    for needle, area in _AREAS:
        if needle in frame:
            return area
    return "other"


def _function(frame: str) -> str:
    # "name (path/to/file.py:123)" -> "name (file.py)": lines would split one function.
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    path = match[2]
    short = "/".join(path.split("/")[-2:])
    return f"{match[1]} ({short})"


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    """Inclusive and self shares per function and per area from py-spy's raw output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    areas_self: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # The thread name py-spy puts first is no frame.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        total += count
        for name in {_function(f) for f in frames}:
            inclusive[name] += count
        own[_function(frames[-1])] += count
        areas_self[_area(frames[-1])] += count

    def shares(counter: Counter[str], n: int) -> list[list[Any]]:
        return [[name, round(100 * c / total, 1)] for name, c in counter.most_common(n)]

    if total == 0:
        return {"samples": 0}
    return {
        "samples": total,
        "self_by_area_pct": shares(areas_self, 20),
        "inclusive_pct": shares(inclusive, top),
        "self_pct": shares(own, top),
        "raw": str(raw),
    }
