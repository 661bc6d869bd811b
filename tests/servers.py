"""Real servers for the tests: a private MariaDB and Postfix's smtp-sink, on 127.0.0.1 only.

Each is started from the Debian packages' binaries in a temporary directory, owned by the
test session, and stopped at its end. Nothing here mocks a protocol.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pymysql


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _find(*names: str) -> str:
    for name in names:
        path = shutil.which(name) or (name if os.path.exists(name) else None)
        if path:
            return path
    raise RuntimeError(
        f"none of {', '.join(names)} is installed; run .ci/run (or apt-get install the Debian"
        " packages it names) to install the test servers"
    )


def _as_user() -> list[str]:
    # mariadbd refuses to run as root unless told to; the tests' server is private anyway.
    return ["--user=root"] if os.geteuid() == 0 else []


@dataclass
class MariaDB:
    """A throwaway MariaDB server; `root` can create a database per test."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    password: str = "relay-test-password"

    @classmethod
    def start(cls, directory: Path) -> MariaDB:
        install = _find("mariadb-install-db", "mysql_install_db")
        data = directory / "data"
        data.mkdir(parents=True)
        subprocess.run(
            [
                install,
                "--no-defaults",
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *_as_user(),
            ],
            check=True,
            capture_output=True,
        )
        server = cls._launch(directory, free_port())
        conn = pymysql.connect(unix_socket=str(directory / "mysql.sock"), user="root")
        with conn.cursor() as cur:
            cur.execute("CREATE USER 'relay'@'127.0.0.1' IDENTIFIED BY %s", (server.password,))
            cur.execute("GRANT ALL ON *.* TO 'relay'@'127.0.0.1'")
        conn.close()
        return server

    @classmethod
    def restart(cls, stopped: MariaDB) -> MariaDB:
        """Start a stopped server again on the same data and port."""
        return cls._launch(stopped.directory, stopped.port)

    @classmethod
    def _launch(cls, directory: Path, port: int) -> MariaDB:
        mariadbd = _find("mariadbd", "/usr/sbin/mariadbd", "mysqld", "/usr/sbin/mysqld")
        log = open(directory / "mariadb.log", "ab")
        process = subprocess.Popen(
            [
                mariadbd,
                "--no-defaults",
                f"--datadir={directory / 'data'}",
                f"--socket={directory / 'mysql.sock'}",
                f"--pid-file={directory / 'mariadb.pid'}",
                "--bind-address=127.0.0.1",
                f"--port={port}",
                "--skip-name-resolve",
                "--max-allowed-packet=64M",
                "--innodb-buffer-pool-size=256M",
                "--innodb-flush-log-at-trx-commit=1",
                "--max-connections=500",
                *_as_user(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                pymysql.connect(unix_socket=str(directory / "mysql.sock"), user="root").close()
                break
            except pymysql.Error:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "MariaDB did not start: " + (directory / "mariadb.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.2)
        return cls(directory, port, process)

    def admin(self) -> pymysql.Connection:
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user="relay",
            password=self.password,
            autocommit=True,
        )

    def create_database(self, name: str) -> None:
        conn = self.admin()
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        conn.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class SmtpSink:
    """Postfix's smtp-sink, dumping each transaction to a file in `directory`."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, *extra: str) -> SmtpSink:
        binary = _find("smtp-sink", "/usr/sbin/smtp-sink")
        # smtp-sink drops root privileges to nobody, who must reach the dump directory:
        # pytest's tmp_path is private to root, so the dumps go to a directory of their own.
        directory = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        directory.chmod(0o777)
        port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        process = subprocess.Popen(
            [binary, *user, "-d", f"{directory}/%Y%m%d%H%M%S.", *extra, f"127.0.0.1:{port}", "100"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port)
        return cls(directory, port, process)

    def messages(self) -> list[SinkMessage]:
        return [SinkMessage.parse(path.read_bytes()) for path in sorted(self.directory.iterdir())]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class SinkMessage:
    """One smtp-sink dump: its envelope lines, then the message with LF line ends."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes

    @classmethod
    def parse(cls, dump: bytes) -> SinkMessage:
        lines = dump.split(b"\n")
        mail_from, rcpts = "", []
        index = 0
        while lines[index].startswith(b"X-"):
            name, _, value = lines[index].partition(b": ")
            if name == b"X-Mail-Args":
                mail_from = value.decode().split()[0].strip("<>")
            elif name == b"X-Rcpt-Args":
                rcpts.append(value.decode().split()[0].strip("<>"))
            index += 1
        # smtp-sink prepends its own Received: header (one line plus continuations).
        assert lines[index].startswith(b"Received: ")
        index += 1
        while lines[index][:1] in (b"\t", b" "):
            index += 1
        body = b"\n".join(lines[index:])
        # The dump ends each transaction with one blank separator line.
        assert body.endswith(b"\n\n") or body == b"\n"
        return cls(mail_from, rcpts, body[:-1])
