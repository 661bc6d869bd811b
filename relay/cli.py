"""`smtp-relay`: run the relay and operate its queue from a shell.

Every command reads the same configuration as `serve` (``--config`` or ``RELAY_CONFIG``,
then ``RELAY_*`` environment variables). Credentials are never taken as arguments: command
lines are visible to every user of the machine through ps and /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from relay import __version__
from relay.clock import utcnow
from relay.config import ConfigError, Settings, load_settings
from relay.logs import configure
from relay.queue import SqlStore, StoreUnavailable, create_store

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp-relay",
        description="A durable SMTP relay: accepts mail, queues it, delivers it through providers.",
    )
    parser.add_argument("--version", action="version", version=f"smtp-relay {__version__}")
    parser.add_argument(
        "--config", "-c", metavar="FILE", help="YAML configuration file (default: $RELAY_CONFIG)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="run the relay: SMTP ingest, delivery workers, HTTP")

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("migrate", help="apply pending schema migrations and exit")

    queue = commands.add_parser("queue", help="inspect the queue")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    status = queue_commands.add_parser(
        "status", help="counts by status and the oldest queued message's age"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    show = queue_commands.add_parser("show", help="one message with per-recipient outcome")
    show.add_argument("message_id", help="the queue id from the 250 reply")

    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    config_commands.add_parser("check", help="validate the configuration and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"smtp-relay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure(settings.log.level, settings.log.format)

    if args.command == "config":
        print("configuration ok")
        return 0
    if args.command == "serve":
        return _run(_serve(settings))
    if args.command == "db":
        return _run(_with_store(settings, _migrate))
    if args.command == "queue" and args.queue_command == "status":
        return _run(_with_store(settings, lambda store: _status(store, as_json=args.json)))
    if args.command == "queue" and args.queue_command == "show":
        return _run(_with_store(settings, lambda store: _show(store, args.message_id)))
    raise AssertionError(args)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(coro)
    except StoreUnavailable as exc:
        print(f"smtp-relay: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


async def _serve(settings: Settings) -> int:
    from relay.service import RelayService

    service = RelayService(settings)
    try:
        await service.run()
    except BaseException:
        await service.store.close()
        raise
    return 0


async def _with_store(
    settings: Settings, action: Callable[[SqlStore], Coroutine[Any, Any, int]]
) -> int:
    store = create_store(settings)
    await store.open()
    try:
        return await action(store)
    finally:
        await store.close()


async def _migrate(store: SqlStore) -> int:
    applied = await store.migrate()
    version = await store.schema_version()
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))}; schema at version {version}")
    else:
        print(f"schema up to date at version {version}")
    return 0


async def _status(store: SqlStore, *, as_json: bool) -> int:
    await store.migrate()
    now = utcnow()
    stats = await store.stats(now=now)
    age = (now - stats.oldest_queued_at).total_seconds() if stats.oldest_queued_at else None
    counts = {s: stats.counts.get(s, 0) for s in _STATUSES}
    report = {
        "backend": store.backend,
        "counts": counts,
        "depth": stats.depth(),
        "deferred": stats.deferred,
        "due": stats.due,
        "oldest_queued_age_seconds": round(age, 3) if age is not None else None,
    }
    if as_json:
        print(json.dumps(report))
        return 0
    print(f"queue ({store.backend})")
    for status_name in _STATUSES:
        print(f"  {status_name:<11} {counts[status_name]:>9}")
    print(f"  {'deferred':<11} {stats.deferred:>9}  (queued, waiting for a retry)")
    print(f"  oldest queued: {_age(age)}")
    return 0


async def _show(store: SqlStore, message_id: str) -> int:
    await store.migrate()
    found = await store.message_status(message_id)
    if found is None:
        print(f"smtp-relay: no message {message_id}", file=sys.stderr)
        return 3
    print(json.dumps(found, default=_json_default, indent=2))
    return 0


_STATUSES = ("queued", "processing", "sent", "failed", "bounced")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat() + "Z"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
