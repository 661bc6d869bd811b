"""A Mailgun-shaped HTTP sink for the drain benchmark: every request gets Mailgun's 200.

Raw asyncio streams rather than http.server or an ASGI stack, so that the sink costs far
less per request than the relay does and the drain measures the relay. It reads each
request whole (Content-Length or chunked), answers with the JSON body Mailgun's
messages.mime returns, keeps the connection alive, and writes its count to a file when
stopped with SIGTERM.

    python -m bench.httpsink --port 8025 --count-file /tmp/sink.count
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


class MailgunSink:
    def __init__(self) -> None:
        self.count = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await _read_body(reader, head)
                self.count += 1
                body = b'{"id": "<%d.bench@sink.test>", "message": "Queued. Thank you."}' % (
                    self.count
                )
                writer.write(_HEAD % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> None:
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    if headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return
    await reader.readexactly(int(headers.get(b"content-length", b"0")))


async def main(port: int) -> int:
    """Serve until SIGTERM; the number of requests answered."""
    sink = MailgunSink()
    server = await asyncio.start_server(sink.serve, "127.0.0.1", port, backlog=256)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    return sink.count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count-file", type=Path, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        args.count_file.write_text(f"{asyncio.run(main(args.port))}\n")
