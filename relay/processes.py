"""Extra processes of one relay: `smtp.processes` and `delivery.processes` event loops.

One event loop tops out at one core, and on two cores Postfix accepts mail with both
(docs/benchmarks.md). The relay's first process binds the listeners, migrates the queue,
serves HTTP, ingests and delivers; with `smtp.processes: N` or `delivery.processes: M` it
starts max(N, M) - 1 more. Process `i` accepts SMTP if i < N and runs delivery workers if
i < M. Ingest processes are handed the listening sockets themselves rather than binding
their own with SO_REUSEPORT: every process accepts from the one kernel queue, so a
connection waits for whichever loop is free, and nothing queued is lost when one exits.

What the processes share, and how:
- accepted mail: the MySQL queue (the embedded SQLite queue is refused with N or M > 1),
  which delivery processes claim from as replicas do;
- maintenance mode, rate-limit overrides, daily quotas, suppressions: the database,
  which every process already follows;
- open sessions, for the connection limits: a count in a shared file
  (relay.ingest.tally), which the first process clears of an extra one that died;
- rate buckets: each ingest process holds 1/N of them (`limits.RateLimiter`); workers,
  provider limits and provider connections: each delivery process holds 1/M of them
  (`Settings.delivery_share`); circuit breakers are each delivery process's own;
- metrics: prometheus_client's multiprocess mode, files in PROMETHEUS_MULTIPROC_DIR,
  added up by the first process's /metrics;
- "there is mail to deliver" (so delivery starts at once, not at the next poll): a byte
  on a pipe per delivery process. An ingest process wakes its own delivery workers, or
  the first process's if it has none; a delivery process that claims a full batch, so
  that more mail is waiting than it holds, wakes the other delivery processes;
- the first process's life: each extra process reads its standard input, which the first
  process holds open and never writes to after the configuration; end of file means the
  first process is gone, and the extra one drains and exits instead of serving orphaned.

The first process supervises the others: one that exits unexpectedly is started again,
after a pause that doubles while it keeps failing. On SIGTERM the first process passes it
on, and every process drains its own sessions and deliveries in parallel.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relay.ingest.tally import SessionTally
from relay.logs import event

if TYPE_CHECKING:
    from relay.config import Settings

log = logging.getLogger("relay.processes")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_RESTART_FIRST_S = 1.0
_RESTART_MAX_S = 30.0
# A process that served this long before exiting is restarted without the longer pause.
_STABLE_S = 60.0
# After the drain's grace: the time a process has to close its sessions and exit.
_EXIT_MARGIN_S = 5.0


def multiprocess_metrics() -> bool:
    return bool(os.environ.get(METRICS_DIR_ENV))


def prepare_metrics_dir() -> Path:
    """Put prometheus_client in multiprocess mode for this process and its children.

    Must run before prometheus_client is imported: it picks its value storage then. A
    directory given in the environment (a Kubernetes emptyDir, say) is used after the
    samples of an earlier run are removed; otherwise a private one is made and removed at
    exit.
    """
    if "prometheus_client" in sys.modules and not multiprocess_metrics():
        raise RuntimeError("prometheus_client was imported before its multiprocess mode was set")
    given = os.environ.get(METRICS_DIR_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path
    path = private_dir("smtp-relay-metrics-")
    os.environ[METRICS_DIR_ENV] = str(path)
    atexit.register(shutil.rmtree, path, True)
    return path


def private_dir(prefix: str) -> Path:
    """A new temporary directory named after this process, once those of dead ones with the
    same prefix are gone: a relay killed with SIGKILL or by the OOM killer never ran its
    clean-up, and the next one does it."""
    sweep_dead_dirs(prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def sweep_dead_dirs(prefix: str) -> None:
    """Remove this user's `<prefix><pid>-*` temporary directories whose pid is gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid() or _alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def mark_dead(pid: int) -> None:
    """Drop a finished process's live gauges (its counters keep counting in the sums)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class WakePipe:
    """Wakes one delivery process from any other, a byte at a time.

    Writes never block: a full pipe already holds a wake-up the reader has not seen.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def listen(read_fd: int, on_wake: Callable[[], None]) -> None:
    def readable() -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(read_fd, 4096):
                pass
        on_wake()

    asyncio.get_running_loop().add_reader(read_fd, readable)


def unlisten(read_fd: int) -> None:
    with contextlib.suppress(Exception):
        asyncio.get_running_loop().remove_reader(read_fd)


def waker(write_fds: list[int]) -> Callable[[], None]:
    def wake() -> None:
        for fd in write_fds:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(fd, b"!")

    return wake


@dataclass(frozen=True)
class Roles:
    """Process `index` of a relay and the pipes it wakes delivery through. Whether it
    ingests or delivers is the settings' answer (`Settings.ingests`, `Settings.delivers`)."""

    index: int
    # Write ends of the other delivery processes' pipes, by index.
    peers: dict[int, int]
    # This process's own pipe's read end, if it delivers.
    woken: int | None = None

    def on_queued(self, own_engine: Callable[[], None] | None) -> Callable[[], None]:
        """Mail queued here: this process's workers, else the first process's."""
        if own_engine is not None:
            return own_engine
        return waker([self.peers[0]]) if 0 in self.peers else lambda: None

    def on_backlog(self) -> Callable[[], None] | None:
        """More mail than this process holds: every other delivery process."""
        return waker(list(self.peers.values())) if self.peers else None


class ExtraProcesses:
    """The first process's view of the extra ones: start, restart, stop."""

    def __init__(
        self,
        settings: Settings,
        config_text: str | None,
        listening: list[tuple[str, int]],
        pipes: dict[int, WakePipe],
        tally: SessionTally | None,
    ) -> None:
        self.settings = settings
        self.count = settings.process_count - 1
        self.tally = tally
        self.config_text = config_text
        self.listening = listening
        self.pipes = pipes
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> int:
        return sum(1 for child in self.children.values() if child.returncode is None)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._supervise(index), name=f"relay-process-{index}")
            for index in range(1, self.count + 1)
        ]

    def _arguments(self, index: int) -> tuple[list[str], list[int]]:
        argv = [sys.executable, "-m", "relay.processes", "--index", str(index)]
        fds = []
        if self.settings.ingests(index):
            for kind, fd in self.listening:
                argv += ["--listen", f"{kind}={fd}"]
                fds.append(fd)
            if self.tally is not None:
                argv += ["--tally", str(self.tally.path)]
        for peer, pipe in self.pipes.items():
            if peer != index:
                argv += ["--wake", f"{peer}={pipe.write_fd}"]
                fds.append(pipe.write_fd)
        if index in self.pipes:
            argv += ["--woken", str(self.pipes[index].read_fd)]
            fds.append(self.pipes[index].read_fd)
        return argv, fds

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        argv, fds = self._arguments(index)
        child = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, pass_fds=fds
        )
        # The configuration goes through the pipe, not the command line (it may hold
        # credentials), framed by its length; the pipe then stays open as the lifeline.
        assert child.stdin is not None
        if self.config_text is None:
            child.stdin.write(b"none\n")  # environment and defaults only
        else:
            body = self.config_text.encode()
            child.stdin.write(b"%d\n" % len(body) + body)
        await child.stdin.drain()
        event(
            log,
            "process.started",
            index=index,
            pid=child.pid,
            ingests=self.settings.ingests(index),
            delivers=self.settings.delivers(index),
        )
        return child

    async def _supervise(self, index: int) -> None:
        pause = _RESTART_FIRST_S
        while not self._stopping:
            started = time.monotonic()
            try:
                child = await self._spawn(index)
            except OSError as exc:
                event(log, "process.failed", logging.ERROR, index=index, error=str(exc))
            else:
                if index in self.children:
                    self.restarts += 1
                self.children[index] = child
                code = await child.wait()
                mark_dead(child.pid)
                if self.tally is not None and self.settings.ingests(index):
                    # Its sessions died with it; the next one starts from none.
                    self.tally.forget(index)
                if self._stopping:
                    return
                event(
                    log,
                    "process.exited",
                    logging.ERROR,
                    index=index,
                    pid=child.pid,
                    returncode=code,
                )
            if time.monotonic() - started > _STABLE_S:
                pause = _RESTART_FIRST_S
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RESTART_MAX_S)

    def signal_stop(self) -> None:
        """Ask every extra process to drain (each does it alongside the others)."""
        self._stopping = True
        for child in self.children.values():
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)

    async def wait(self, grace_s: float) -> None:
        """Wait for the drained processes to exit; kill what outlives the grace period."""
        self.signal_stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        deadline = time.monotonic() + grace_s + _EXIT_MARGIN_S
        for index, child in self.children.items():
            try:
                await asyncio.wait_for(child.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                event(log, "process.killed", logging.WARNING, index=index, pid=child.pid)
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
            if child.stdin is not None:
                child.stdin.close()
            mark_dead(child.pid)


# The extra process itself


def _read_config(stream: int) -> str | None:
    header = b""
    while not header.endswith(b"\n"):
        chunk = os.read(stream, 1)
        if not chunk:
            raise SystemExit("relay.processes: the first process closed the pipe")
        header += chunk
    if header == b"none\n":
        return None
    size = int(header)
    body = b""
    while len(body) < size:
        chunk = os.read(stream, size - len(body))
        if not chunk:
            raise SystemExit("relay.processes: the configuration was cut short")
        body += chunk
    return body.decode()


def tag_logs(index: int) -> None:
    """Mark every log line of this process with `process_index` (the first process is 0)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Tag(index))


class _Tag(logging.Filter):
    """Marks this process's log lines: `process_index`."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_index = self.index
        return True


async def _serve(
    roles: Roles,
    listening: list[tuple[str, int]],
    tally_path: Path | None,
    text: str | None,
) -> None:
    from relay.config import parse_settings
    from relay.logs import configure
    from relay.service import RelayService

    index = roles.index
    settings = parse_settings(text, f"relay process {index}")
    configure(settings.log.level, settings.log.format)
    tag_logs(index)
    inherited = [(kind, socket.socket(fileno=fd)) for kind, fd in listening]
    tally = None
    if tally_path is not None:
        tally = SessionTally(tally_path, settings.smtp.processes, index)
    service = RelayService(settings, roles=roles, inherited=inherited, tally=tally)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def lifeline() -> None:
        # Nothing more is ever written: readable means end of file, the first process died.
        if not os.read(sys.stdin.fileno(), 1):
            loop.remove_reader(sys.stdin.fileno())
            event(log, "process.orphaned", logging.WARNING, index=index)
            stop.set()

    loop.add_reader(sys.stdin.fileno(), lifeline)
    await service.start()
    await stop.wait()
    await service.stop()


def _fd_by_index(item: str) -> tuple[int, int]:
    index, _, fd = item.partition("=")
    return int(index), int(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay.processes", description=__doc__)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[], metavar="KIND=FD")
    parser.add_argument("--tally", type=Path, help="the shared session count's file")
    parser.add_argument(
        "--wake", action="append", default=[], metavar="INDEX=FD", help="a delivery pipe"
    )
    parser.add_argument("--woken", type=int, metavar="FD", help="this process's own pipe")
    args = parser.parse_args(argv)
    # Until the event loop takes them over, a stop signal ends a process that has not
    # accepted anything yet: nothing to drain.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    if not multiprocess_metrics():
        print(f"relay.processes: {METRICS_DIR_ENV} is not set", file=sys.stderr)
        return 2
    listening = []
    for item in args.listen:
        kind, _, fd = item.partition("=")
        listening.append((kind, int(fd)))
    roles = Roles(
        index=args.index,
        peers=dict(_fd_by_index(item) for item in args.wake),
        woken=args.woken,
    )
    text = _read_config(sys.stdin.fileno())
    asyncio.run(_serve(roles, listening, args.tally, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
