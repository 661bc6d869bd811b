"""A real HTTP/1.1 server on 127.0.0.1 for the HTTP API providers' tests, and a guard that
keeps every connection a test opens on this machine.

The server records each request as it arrived (method, path, query, headers, body bytes)
and answers from a route table of plain functions, so a test can both play the documented
contract and assert afterwards exactly what the provider sent.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def form(self) -> dict[str, list[str]]:
        assert self.headers.get("content-type") == "application/x-www-form-urlencoded"
        return parse_qs(self.body.decode("ascii"), keep_blank_values=True, strict_parsing=True)

    def multipart(self) -> list[Part]:
        """The form-data parts in order, each part's bytes exactly as sent (RFC 7578)."""
        kind, _, boundary = self.headers["content-type"].partition("; boundary=")
        assert kind == "multipart/form-data" and boundary
        chunks = self.body.split(b"--" + boundary.strip('"').encode("ascii"))
        assert chunks[0] == b"" and chunks[-1] in (b"--\r\n", b"--"), "bad multipart framing"
        parts = []
        for chunk in chunks[1:-1]:
            assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n"), "bad part framing"
            head, separator, data = chunk[2:-2].partition(b"\r\n\r\n")
            assert separator, "part without a header block"
            headers = Message()
            for line in head.decode("utf-8").split("\r\n"):
                name, _, value = line.partition(":")
                headers[name.strip()] = value.strip()
            disposition = "content-disposition"
            assert headers.get_content_disposition() == "form-data"
            parts.append(
                Part(
                    name=str(headers.get_param("name", header=disposition)),
                    filename=headers.get_filename(),
                    content_type=headers.get("content-type"),
                    data=data,
                )
            )
        return parts


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Reply]


class LocalApi:
    """Serves routes on 127.0.0.1 from a thread; records every request in `requests`."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self._routes: dict[tuple[str, str], Handler] = {}
        self._server = ThreadingHTTPServer((LOOPBACK, 0), _handler_class(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def route(self, method: str, path: str, handler: Handler) -> None:
        self._routes[(method, path)] = handler

    def to(self, path: str) -> list[Request]:
        return [request for request in self.requests if request.path == path]

    def start(self) -> LocalApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _answer(self, request: Request) -> Reply:
        self.requests.append(request)
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            return Reply(404, body=b"no such route")
        try:
            return handler(request)
        except Exception as exc:
            # Surfaced by the fixture's teardown; the provider sees a plain 500.
            self.errors.append(f"{request.method} {request.path}: {exc!r}")
            return Reply(500, body=b"test server error")


def _handler_class(api: LocalApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _serve(self) -> None:
            if "chunked" in self.headers.get("Transfer-Encoding", ""):
                api.errors.append(f"{self.command} {self.path}: chunked body, no Content-Length")
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            split = urlsplit(self.path)
            request = Request(
                method=self.command,
                path=split.path,
                query=parse_qs(split.query, keep_blank_values=True),
                headers={name.lower(): value for name, value in self.headers.items()},
                body=body,
            )
            reply = api._answer(request)
            payload = reply.body if reply.json is None else json.dumps(reply.json).encode()
            self.send_response(reply.status)
            if reply.json is not None:
                self.send_header("Content-Type", "application/json; charset=UTF-8")
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the tests assert on recorded requests, not on stderr

    return Handler


def only_loopback(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, any lookup of or connection to anything but 127.0.0.1 fails and is listed.

    The providers' defaults are Google's and Mailgun's real hosts: a test that forgot an
    override meets this guard instead of the Internet.
    """
    refused: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name != LOOPBACK:
            refused.append(name)
            raise OSError(f"test guard: lookup of {host!r} refused, only {LOOPBACK} allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != LOOPBACK:
            refused.append(str(address[0]))
            raise OSError(f"test guard: connection to {address!r} refused")
        real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return refused


def start_api() -> LocalApi:
    return LocalApi().start()


def closed_port_url() -> str:
    """A 127.0.0.1 URL that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    return f"http://{LOOPBACK}:{port}"
