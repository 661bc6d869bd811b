"""The servers a benchmark runs: each private, on 127.0.0.1, in the run's temporary directory.

MariaDB comes from the test suite's class (tests/servers.py) with a larger buffer pool and
redo log set at run time; Postfix is a private instance with its own configuration and
queue directories, never the system's /etc/postfix; the relay runs as its users run it,
`smtp-relay --config FILE serve`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
import yaml

from tests.servers import MariaDB, free_port, wait_for_port

# The venv's bin directory: smtp-relay and py-spy live next to the interpreter.
VENV_BIN = Path(sys.executable).parent

MIB = 1024 * 1024

# Durability is the point of the comparison: innodb_flush_log_at_trx_commit stays 1 (the
# test class sets it). A bigger buffer pool keeps a 100,000-message backlog (about 500 MB)
# in memory and a bigger redo log keeps checkpoints from throttling a long run; both are
# dynamic in MariaDB 10.9+. Postfix gets the page cache for the same purpose.
INNODB_TUNING = {
    "innodb_buffer_pool_size": 1024 * MIB,
    "innodb_log_file_size": 512 * MIB,
}
_REPORTED_VARIABLES = (
    "version",
    "innodb_flush_log_at_trx_commit",
    "innodb_buffer_pool_size",
    "innodb_log_file_size",
    "innodb_flush_method",
    "innodb_doublewrite",
    "log_bin",
    "sync_binlog",
)


def _root(server: MariaDB) -> pymysql.Connection:
    return pymysql.connect(
        unix_socket=str(server.directory / "mysql.sock"), user="root", autocommit=True
    )


def start_mariadb(directory: Path) -> tuple[MariaDB, dict[str, str]]:
    """A private MariaDB tuned for a durable queue, and the settings it runs with."""
    server = MariaDB.start(directory)
    conn = _root(server)
    with conn.cursor() as cur:
        for name, value in INNODB_TUNING.items():
            cur.execute(f"SET GLOBAL {name} = {int(value)}")
        # The buffer pool resize runs in the background; wait so the run measures the
        # server as configured.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cur.execute("SHOW STATUS LIKE 'Innodb_buffer_pool_resize_status'")
            row = cur.fetchone()
            if not row or not row[1] or "Completed" in row[1]:
                break
            time.sleep(0.2)
        variables = {}
        for name in _REPORTED_VARIABLES:
            cur.execute(f"SELECT @@{name}")
            variables[name] = str(cur.fetchone()[0])
    conn.close()
    return server, variables


def drop_database(server: MariaDB, name: str) -> None:
    conn = _root(server)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def count_messages(server: MariaDB, database: str, status: str | None = None) -> int:
    conn = server.admin()
    with conn.cursor() as cur:
        if status is None:
            cur.execute(f"SELECT COUNT(*) FROM `{database}`.messages")  # noqa: S608 - ours
        else:
            cur.execute(
                f"SELECT COUNT(*) FROM `{database}`.messages WHERE status = %s",  # noqa: S608
                (status,),
            )
        count = int(cur.fetchone()[0])
    conn.close()
    return count


# What the server did per message: statements (round trips) and redo-log fsyncs, the
# evidence for or against batching the relay's queue writes.
_COUNTERS = (
    "Questions",
    "Com_begin",
    "Com_commit",
    "Com_insert",
    "Com_select",
    "Com_update",
    # MariaDB 10.8+ counts redo-log fsyncs in Innodb_data_fsyncs.
    "Innodb_data_fsyncs",
    "Innodb_log_writes",
    "Innodb_os_log_written",
    # Index entries walked: a claim that steps over entries of rows already claimed
    # (delete-marked, not yet purged) shows here as more than a batch per claim.
    "Handler_read_next",
    "Innodb_rows_read",
)


def server_counters(server: MariaDB) -> dict[str, int]:
    conn = _root(server)
    with conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS")
        found = {name: int(value) for name, value in cur.fetchall() if name in _COUNTERS}
    conn.close()
    return found


def counters_per_message(
    before: dict[str, int], after: dict[str, int], messages: int
) -> dict[str, float]:
    return {
        name: round((after[name] - before[name]) / max(messages, 1), 2)
        for name in _COUNTERS
        if name in before and name in after
    }


# Postfix

_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {maillog}
maillog_file_prefixes = {root}
myhostname = postfix.bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# Every message goes to the hold queue: accepted durably, never delivered.
smtpd_recipient_restrictions = check_client_access static:HOLD, permit_mynetworks, reject
smtpd_relay_restrictions = permit_mynetworks, reject
"""

# Debian's master.cf services the SMTP path and the hold queue need, unchrooted (a chroot
# would need copies of /etc files under the queue directory), with smtpd on our own port.
_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixHold:
    """A private Postfix that takes mail over SMTP and holds every message."""

    directory: Path
    port: int

    @property
    def config(self) -> Path:
        return self.directory / "conf"

    @property
    def queue(self) -> Path:
        return self.directory / "queue"

    @classmethod
    def start(cls, directory: Path) -> PostfixHold:
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root (postfix -c DIR start)")
        instance = cls(directory, free_port())
        for name in ("conf", "queue", "data"):
            (directory / name).mkdir(parents=True)
        # postfix(1) wants data_directory owned by mail_owner; the queue is set up by start.
        postfix_user = pwd.getpwnam("postfix")
        os.chown(directory / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        (instance.config / "main.cf").write_text(
            _MAIN_CF.format(
                queue=instance.queue,
                data=directory / "data",
                maillog=directory / "maillog",
                root=directory,
            )
        )
        (instance.config / "master.cf").write_text(_MASTER_CF.format(port=instance.port))
        instance._postfix("start")
        wait_for_port(instance.port)
        return instance

    def _postfix(self, *args: str, program: str = "postfix") -> None:
        # Postfix reports to its log file, not to a stderr that is not a terminal.
        result = subprocess.run(  # noqa: S603 - Postfix's own commands on our directory
            [_find(program), "-c", str(self.config), *args], capture_output=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({result.returncode}): "
                + self.log_tail()
                + result.stderr.decode(errors="replace")
            )

    def log_tail(self) -> str:
        log = self.directory / "maillog"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def held(self) -> int:
        return sum(1 for _ in os.scandir(self.queue / "hold"))

    def clear(self) -> None:
        self._postfix("-d", "ALL", "hold", program="postsuper")

    def master_pid(self) -> int:
        return int((self.queue / "pid" / "master.pid").read_text().split()[0])

    def stop(self) -> None:
        self._postfix("stop")


def _find(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.path.exists(path):
        raise RuntimeError(f"{name} is not installed (Debian package postfix)")
    return path


# Sinks


@dataclass
class Sink:
    """A delivery target process: Postfix's smtp-sink or our Mailgun-shaped HTTP sink."""

    port: int
    process: subprocess.Popen[bytes]

    @classmethod
    def smtp(cls) -> Sink:
        # No dump directory (unlike the tests' SmtpSink): writing 100,000 files would make
        # the sink, not the relay, the thing measured.
        port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        process = subprocess.Popen(  # noqa: S603 - fixed arguments
            [_find("smtp-sink"), *user, f"127.0.0.1:{port}", "256"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port)
        return cls(port, process)

    @classmethod
    def mailgun(cls, count_file: Path) -> Sink:
        port = free_port()
        process = subprocess.Popen(  # noqa: S603 - fixed arguments
            [
                sys.executable,
                "-m",
                "bench.httpsink",
                "--port",
                str(port),
                "--count-file",
                str(count_file),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(port)
        return cls(port, process)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# The relay


def relay_config(
    server: MariaDB,
    database: str,
    directory: Path,
    *,
    delivery: dict[str, Any] | None = None,
    providers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A production-shaped configuration: MariaDB queue, JSON logs at INFO."""
    password_file = directory / "db-password"
    password_file.write_text(server.password + "\n")
    return {
        "smtp": {"host": "127.0.0.1", "port": free_port(), "hostname": "relay.bench.test"},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "queue": {
            "backend": "mysql",
            "mysql": {
                "host": "127.0.0.1",
                "port": server.port,
                "user": "relay",
                "password_file": str(password_file),
                "database": database,
            },
        },
        # The default workspace's token bucket (10 messages/s) would measure itself.
        "workspaces": {
            "default": {"limits": {"rate_limit_burst": 10**9, "rate_limit_refill": 10**9}}
        },
        "delivery": delivery if delivery is not None else {"enabled": False},
        "providers": providers or {"outbox": {"type": "outbox", "directory": str(directory)}},
    }


# What-if runs only: the unchanged relay on uvloop's event loop, chosen before
# relay.cli's asyncio.run creates the loop.
_UVLOOP_MAIN = (
    "import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "from relay.cli import main; sys.exit(main())"
)


@dataclass
class RelayProcess:
    process: subprocess.Popen[bytes]
    smtp_port: int
    http_port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(
        cls, config: dict[str, Any], directory: Path, name: str, *, loop: str = "asyncio"
    ) -> RelayProcess:
        path = directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = directory / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        command = [str(VENV_BIN / "smtp-relay")]
        if loop == "uvloop":
            command = [sys.executable, "-c", _UVLOOP_MAIN]
        process = subprocess.Popen(  # noqa: S603 - our own configuration file
            [*command, "--config", str(path), "serve"],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        relay = cls(process, config["smtp"]["port"], config["http"]["port"], log)
        relay.wait_ready()
        return relay

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("relay exited at start-up:\n" + self.log_tail())
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        wait_for_port(self.smtp_port)
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"relay not ready after {timeout}s:\n" + self.log_tail())

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
