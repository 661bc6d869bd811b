"""Extra ingest processes: `smtp.processes` event loops accepting on one set of sockets.

One event loop tops out at one core, and on two cores Postfix accepts mail with both
(docs/benchmarks.md). With `smtp.processes: N` the relay's first process, which binds the
listeners, runs delivery and HTTP and migrates the queue, starts N - 1 more that only
accept SMTP. They are handed the listening sockets themselves rather than binding their
own with SO_REUSEPORT: every process accepts from the one kernel queue, so a connection
waits for whichever loop is free, and nothing queued is lost when one of them exits.

What the processes share, and how:
- accepted mail: the MySQL queue (the embedded SQLite queue is refused with N > 1);
- maintenance mode, rate-limit overrides, daily quotas, suppressions: the database,
  which every process already follows;
- open sessions, for the connection limits: a count in a shared file
  (relay.ingest.tally), which the first process clears of an extra one that died;
- rate buckets: each process holds 1/N of them (`limits.RateLimiter`);
- metrics: prometheus_client's multiprocess mode, files in PROMETHEUS_MULTIPROC_DIR,
  added up by the first process's /metrics;
- "mail was queued" (so delivery starts at once, not at the next poll): a byte on a pipe
  that the first process reads;
- the first process's life: each extra process reads its standard input, which the first
  process holds open and never writes to after the configuration; end of file means the
  first process is gone, and the extra one drains and exits instead of serving orphaned.

The first process supervises the others: one that exits unexpectedly is started again,
after a pause that doubles while it keeps failing. On SIGTERM the first process passes it
on, and every process drains its own sessions in parallel.
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
from pathlib import Path

from relay.ingest.tally import SessionTally
from relay.logs import event

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
    path = Path(tempfile.mkdtemp(prefix="smtp-relay-metrics-"))
    os.environ[METRICS_DIR_ENV] = str(path)
    atexit.register(shutil.rmtree, path, True)
    return path


def mark_dead(pid: int) -> None:
    """Drop a finished process's live gauges (its counters keep counting in the sums)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class WakePipe:
    """Extra processes tell the first one that mail was queued, a byte at a time.

    Writes never block: a full pipe already holds a wake-up the reader has not seen.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def listen(self, on_wake: Callable[[], None]) -> None:
        def readable() -> None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.read_fd, 4096):
                    pass
            on_wake()

        asyncio.get_running_loop().add_reader(self.read_fd, readable)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.read_fd)
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def waker(write_fd: int) -> Callable[[], None]:
    def wake() -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(write_fd, b"!")

    return wake


class IngestProcesses:
    """The first process's view of the extra ones: start, restart, stop."""

    def __init__(
        self,
        count: int,
        config_text: str | None,
        listening: list[tuple[str, int]],
        wake_fd: int,
        tally: SessionTally | None,
    ) -> None:
        self.count = count
        self.tally = tally
        self.config_text = config_text
        self.listening = listening
        self.wake_fd = wake_fd
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> int:
        return sum(1 for child in self.children.values() if child.returncode is None)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._supervise(index), name=f"ingest-process-{index}")
            for index in range(1, self.count + 1)
        ]

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        fds = [fd for _, fd in self.listening] + [self.wake_fd]
        argv = [sys.executable, "-m", "relay.processes", "--index", str(index)]
        argv += ["--wake", str(self.wake_fd)]
        for kind, fd in self.listening:
            argv += ["--listen", f"{kind}={fd}"]
        if self.tally is not None:
            argv += ["--tally", str(self.tally.path)]
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
        event(log, "ingest.process_started", index=index, pid=child.pid)
        return child

    async def _supervise(self, index: int) -> None:
        pause = _RESTART_FIRST_S
        while not self._stopping:
            started = time.monotonic()
            try:
                child = await self._spawn(index)
            except OSError as exc:
                event(log, "ingest.process_failed", logging.ERROR, index=index, error=str(exc))
            else:
                self.children[index] = child
                code = await child.wait()
                mark_dead(child.pid)
                if self.tally is not None:
                    # Its sessions died with it; the next one starts from none.
                    self.tally.forget(index)
                if self._stopping:
                    return
                event(
                    log,
                    "ingest.process_exited",
                    logging.ERROR,
                    index=index,
                    pid=child.pid,
                    returncode=code,
                )
                self.restarts += 1
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
                event(log, "ingest.process_killed", logging.WARNING, index=index, pid=child.pid)
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


class _Tag(logging.Filter):
    """Marks this process's log lines: `ingest_process`, its index (the first is 0)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.ingest_process = self.index
        return True


async def _serve(
    index: int,
    listening: list[tuple[str, int]],
    wake_fd: int,
    tally_path: Path | None,
    text: str | None,
) -> None:
    from relay.config import parse_settings
    from relay.logs import configure
    from relay.service import RelayService

    settings = parse_settings(text, f"ingest process {index}")
    configure(settings.log.level, settings.log.format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Tag(index))
    inherited = [(kind, socket.socket(fileno=fd)) for kind, fd in listening]
    tally = None
    if tally_path is not None:
        tally = SessionTally(tally_path, settings.smtp.processes, index)
    service = RelayService(settings, inherited=inherited, on_queued=waker(wake_fd), tally=tally)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def lifeline() -> None:
        # Nothing more is ever written: readable means end of file, the first process died.
        if not os.read(sys.stdin.fileno(), 1):
            loop.remove_reader(sys.stdin.fileno())
            event(log, "ingest.orphaned", logging.WARNING, index=index)
            stop.set()

    loop.add_reader(sys.stdin.fileno(), lifeline)
    await service.start()
    await stop.wait()
    await service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay.processes", description=__doc__)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--wake", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[], metavar="KIND=FD")
    parser.add_argument("--tally", type=Path, help="the shared session count's file")
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
    text = _read_config(sys.stdin.fileno())
    asyncio.run(_serve(args.index, listening, args.wake, args.tally, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
