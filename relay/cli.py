"""`smtp-relay`: run the relay and operate its queue from a shell.

Every command reads the same configuration as `serve` (``--config`` or ``RELAY_CONFIG``,
then ``RELAY_*`` environment variables). Credentials are never taken as arguments: command
lines are visible to every user of the machine through ps and /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from relay import __version__
from relay.clock import utcnow
from relay.config import ConfigError, Settings, load_config
from relay.logs import configure
from relay.queue import SqlStore, StoreUnavailable, create_store

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 1
# What a shell reports for a process ended by SIGPIPE (128 + 13), as `yes | head` shows.
EXIT_PIPE_CLOSED = 141


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
    queue_commands.add_parser("flush", help="make deferred mail due now (runbook 4.2)")
    stuck = queue_commands.add_parser(
        "requeue-stuck", help="return messages claimed long ago to the queue (runbook 4.2)"
    )
    stuck.add_argument("--older-than", default="30m", help="claim age (default 30m)")
    stuck.add_argument("--reset-retry-count", action="store_true")

    commands.add_parser("stats", help="delivery and error rates, queue depth (JSON)")

    recipients = commands.add_parser("recipients", help="recipient list maintenance")
    recipient_commands = recipients.add_subparsers(
        dest="recipients_command", required=True, metavar="ACTION"
    )
    cleanup = recipient_commands.add_parser(
        "cleanup", help="mark addresses with repeated hard bounces INACTIVE (runbook 4.3)"
    )
    cleanup.add_argument("--threshold", type=int, default=3)

    _bounce_commands(commands)

    maintenance = commands.add_parser(
        "maintenance", help="service-wide maintenance mode (runbook 6.1)"
    )
    maintenance.add_argument("state", choices=["on", "off", "status"])
    maintenance.add_argument("--message", help="text for the 421 reply")

    commands.add_parser(
        "hash-password",
        help="print an Argon2 hash for workspaces.<id>.users.<name>.password_hash",
        description="Reads the password from standard input (or prompts on a terminal), never"
        " from the command line, where other users could read it.",
    )

    rate = commands.add_parser("rate-limit", help="temporary limit overrides (runbook 4.7)")
    rate_commands = rate.add_subparsers(dest="rate_command", required=True, metavar="ACTION")
    rate_set = rate_commands.add_parser(
        "set", help="raise a workspace's limits until an expiry; reverts by itself"
    )
    rate_set.add_argument("--workspace", required=True)
    rate_set.add_argument(
        "--for",
        dest="duration",
        default="1h",
        help="how long the override lasts (default 1h; e.g. 30m, 2h)",
    )
    rate_set.add_argument("--workspace-daily", type=int)
    rate_set.add_argument("--per-user-daily", type=int)
    rate_set.add_argument("--burst", type=int)
    rate_set.add_argument("--refill", type=float, help="tokens per second")
    rate_clear = rate_commands.add_parser("clear", help="end a workspace's override now")
    rate_clear.add_argument("--workspace", required=True)
    rate_commands.add_parser("show", help="limits and today's usage per workspace")

    providers = commands.add_parser("providers", help="delivery providers")
    provider_commands = providers.add_subparsers(
        dest="providers_command", required=True, metavar="ACTION"
    )
    validate = provider_commands.add_parser(
        "validate",
        help="check each provider's reachability and credentials without sending mail",
    )
    validate.add_argument("names", nargs="*", help="providers to check (default: all)")
    validate.add_argument("--json", action="store_true", help="machine-readable output")

    audit = commands.add_parser("audit", help="recent audit log entries (runbook 5.3)")
    audit.add_argument("--limit", type=int, default=50)

    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    config_commands.add_parser("check", help="validate the configuration and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = _command(argv)
        sys.stdout.flush()  # inside the try: a reader gone shows here, at the latest
    except BrokenPipeError:
        # `smtp-relay queue status | head -1`: the reader stopped reading, which is not
        # this command's error. Python would otherwise print a traceback, and another
        # when it flushes stdout at exit; stdout goes to /dev/null so that it cannot.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    return code


def _command(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-password":
        return _hash_password()
    try:
        # Secret files must be readable where they will be used: by the relay itself.
        settings, config_text = load_config(args.config, files=args.command in ("config", "serve"))
    except ConfigError as exc:
        print(f"smtp-relay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure(settings.log.level, settings.log.format)

    if args.command == "config":
        print("configuration ok")
        return 0
    if args.command == "serve":
        return _run(_serve(settings, config_text))
    if args.command == "db":
        return _run(_with_store(settings, _migrate))
    if args.command == "queue" and args.queue_command == "status":
        return _run(_with_store(settings, lambda store: _status(store, as_json=args.json)))
    if args.command == "queue" and args.queue_command == "show":
        return _run(_with_store(settings, lambda store: _show(store, args.message_id)))
    if args.command == "rate-limit":
        return _run(_with_store(settings, lambda store: _rate_limit(store, settings, args)))
    if args.command == "queue" and args.queue_command == "flush":
        return _run(_with_store(settings, _flush))
    if args.command == "queue" and args.queue_command == "requeue-stuck":
        return _run(_with_store(settings, lambda store: _requeue_stuck(store, args)))
    if args.command == "stats":
        return _run(_with_store(settings, _print_stats))
    if args.command == "recipients":
        return _run(_with_store(settings, lambda store: _cleanup(store, args.threshold)))
    if args.command in ("suppressions", "bounces"):
        return _run(_with_store(settings, lambda store: _bounces(store, settings, args)))
    if args.command == "maintenance":
        return _run(_with_store(settings, lambda store: _maintenance(store, args)))
    if args.command == "providers":
        return _run(_validate_providers(settings, args.names, as_json=args.json))
    if args.command == "audit":
        return _run(_with_store(settings, lambda store: _audit(store, args.limit)))
    raise AssertionError(args)


def _operator() -> str:
    return f"cli:{getpass.getuser()}"


async def _flush(store: SqlStore) -> int:
    await store.migrate()
    count = await store.flush(now=utcnow())
    await store.audit(
        action="queue.flush", outcome="success", user_id=_operator(), detail=str(count)
    )
    print(
        f"{count} deferred message(s) due now; running relays pick them up within"
        " delivery.process_interval"
    )
    return 0


async def _requeue_stuck(store: SqlStore, args: argparse.Namespace) -> int:
    from relay.config import parse_duration

    await store.migrate()
    count = await store.requeue_stuck(
        older_than=utcnow() - parse_duration(args.older_than),
        reset_retries=args.reset_retry_count,
    )
    await store.audit(
        action="queue.requeue_stuck",
        outcome="success",
        user_id=_operator(),
        detail=json.dumps({"older_than": args.older_than, "count": count}),
    )
    print(f"{count} message(s) returned to the queue")
    return 0


async def _print_stats(store: SqlStore) -> int:
    from datetime import timedelta

    await store.migrate()
    now = utcnow()
    queue = await store.stats(now=now)
    finished = await store.outcomes_since(now - timedelta(hours=1))
    total = sum(finished.values())
    delivered = finished.get("sent", 0)
    report = {
        "counts": queue.counts,
        "queue_depth": queue.depth(),
        "deferred": queue.deferred,
        "oldest_queued_age_seconds": (
            (now - queue.oldest_queued_at).total_seconds() if queue.oldest_queued_at else None
        ),
        "window_seconds": 3600,
        "finished": finished,
        "delivery_rate": round(100 * delivered / total, 2) if total else None,
        "error_rate": round(100 * (total - delivered) / total, 2) if total else None,
    }
    print(json.dumps(report, default=str))
    return 0


async def _cleanup(store: SqlStore, threshold: int) -> int:
    await store.migrate()
    count = await store.deactivate_hard_bounces(threshold=threshold)
    await store.audit(
        action="recipients.cleanup",
        outcome="success",
        user_id=_operator(),
        detail=json.dumps({"threshold": threshold, "count": count}),
    )
    print(f"{count} address(es) marked INACTIVE")
    return 0


def _bounce_commands(commands: Any) -> None:
    suppressions = commands.add_parser(
        "suppressions", help="the suppression list: INACTIVE addresses (runbook 4.3)"
    )
    actions = suppressions.add_subparsers(
        dest="suppressions_command", required=True, metavar="ACTION"
    )
    listing = actions.add_parser("list", help="suppressed addresses, newest first")
    listing.add_argument("--workspace", help="only this workspace (default: all)")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (
        ("show", "one address: bounce counts, suppression, recent events"),
        ("add", "suppress an address by hand"),
        ("remove", "lift a suppression (the bounce count starts again)"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("address")
        action.add_argument("--workspace", help="default: smtp.workspace")
        if name == "add":
            action.add_argument(
                "--reason", choices=["manual", "complaint", "hard_bounce"], default="manual"
            )
            action.add_argument("--detail", help="why, for the record")
    bounces = commands.add_parser("bounces", help="bounce statistics (runbook 4.3)")
    bounce_actions = bounces.add_subparsers(dest="bounces_command", required=True, metavar="ACTION")
    stats = bounce_actions.add_parser(
        "stats", help="by workspace and type, by recipient domain, by reason (JSON)"
    )
    stats.add_argument("--workspace", help="only this workspace (default: all)")
    stats.add_argument("--hours", type=int, default=24, help="window (default 24)")


async def _bounces(store: SqlStore, settings: Settings, args: argparse.Namespace) -> int:
    from datetime import timedelta

    from relay.bounces.model import SuppressionReason
    from relay.ingest.policy import AddressError, normalise

    await store.migrate()
    if args.command == "bounces":
        since = utcnow() - timedelta(hours=args.hours)
        report = await store.bounce_stats(since=since, workspace_id=args.workspace)
        print(json.dumps({"since": since, **report}, default=_json_default, indent=2))
        return 0
    action = args.suppressions_command
    if action == "list":
        found = await store.suppressions(workspace_id=args.workspace, limit=args.limit)
        if args.json:
            print(json.dumps(found, default=_json_default))
        for entry in [] if args.json else found:
            print(
                f"{entry['workspace_id']:<16} {entry['email_address']:<40}"
                f" {entry['reason']:<12} since {_json_default(entry['since'])}"
            )
        return 0
    workspace = args.workspace or settings.smtp.workspace
    try:
        address = normalise(args.address, smtputf8=True, role="recipient").lower()
    except AddressError as exc:
        print(f"smtp-relay: {exc.args[0]}", file=sys.stderr)
        return EXIT_CONFIG
    if action == "show":
        record = await store.recipient_record(workspace_id=workspace, address=address)
        if record is None:
            print(f"smtp-relay: no bounce record for {address} in {workspace}", file=sys.stderr)
            return 3
        print(json.dumps(record, default=_json_default, indent=2))
        return 0
    if action == "add":
        changed = await store.suppress(
            workspace_id=workspace,
            address=address,
            reason=SuppressionReason(args.reason),
            detail=args.detail,
            created_by=_operator(),
            now=utcnow(),
        )
    else:
        changed = await store.unsuppress(workspace_id=workspace, address=address, now=utcnow())
    await store.audit(
        action=f"suppression.{action}",
        outcome="success" if changed else "unchanged",
        user_id=_operator(),
        detail=json.dumps({"workspace": workspace, "address": address}),
    )
    done = {"add": ("suppressed", "already suppressed"), "remove": ("lifted", "not suppressed")}
    print(f"{address} in {workspace}: {done[action][0 if changed else 1]}")
    return 0 if changed or action == "add" else 3


async def _maintenance(store: SqlStore, args: argparse.Namespace) -> int:
    from relay.service import MAINTENANCE

    await store.migrate()
    if args.state == "status":
        state = await store.get_state(MAINTENANCE)
        value = json.loads(state[0]) if state else {"enabled": False, "message": None}
        print(json.dumps({**value, "updated_by": state[1] if state else None}))
        return 0
    enabled = args.state == "on"
    value = json.dumps({"enabled": enabled, "message": args.message})
    await store.set_state(MAINTENANCE, value, updated_by=_operator())
    await store.audit(action="maintenance", outcome="success", user_id=_operator(), detail=value)
    print(f"maintenance {args.state}; every relay follows within 5 s")
    return 0


async def _validate_providers(settings: Settings, names: list[str], *, as_json: bool) -> int:
    from relay.delivery.providers import build_providers, validate_all

    unknown = [name for name in names if name not in settings.providers]
    if unknown:
        print(f"smtp-relay: no provider named {', '.join(unknown)}", file=sys.stderr)
        return EXIT_CONFIG
    providers = build_providers(settings)
    chosen = {n: p for n, p in providers.items() if not names or n in names}
    try:
        report = await validate_all(chosen)
    finally:
        for provider in providers.values():
            await provider.close()
    if as_json:
        print(json.dumps(report))
    else:
        for entry in report:
            mark = "ok" if entry["ok"] else f"FAILED ({entry['kind']}): {entry['error']}"
            print(f"{entry['provider']:<16} {mark}")
    return 0 if all(entry["ok"] for entry in report) else 1


def _hash_password() -> int:
    from relay.ingest.policy import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("smtp-relay: the passwords differ", file=sys.stderr)
            return EXIT_CONFIG
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 12:
        print("smtp-relay: use at least 12 characters", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(password))
    return 0


async def _rate_limit(store: SqlStore, settings: Settings, args: argparse.Namespace) -> int:
    from relay.config import parse_duration
    from relay.limits import Override

    await store.migrate()
    now = utcnow()
    if args.rate_command == "set":
        duration = parse_duration(args.duration)
        override = Override(
            workspace_id=args.workspace,
            expires_at=now + duration,
            workspace_daily=args.workspace_daily,
            per_user_daily=args.per_user_daily,
            rate_limit_burst=args.burst,
            rate_limit_refill=args.refill,
            created_by=f"cli:{getpass.getuser()}",
        )
        await store.set_override(override)
        await store.audit(
            action="rate_limit.override_set",
            outcome="success",
            user_id=override.created_by,
            detail=_describe_override(override),
        )
        print(f"override for {args.workspace} until {override.expires_at.isoformat()}Z")
        return 0
    if args.rate_command == "clear":
        cleared = await store.clear_override(args.workspace)
        await store.audit(
            action="rate_limit.override_cleared",
            outcome="success" if cleared else "not_found",
            user_id=f"cli:{getpass.getuser()}",
            detail=args.workspace,
        )
        print("cleared" if cleared else f"no override for {args.workspace}")
        return 0 if cleared else 3
    overrides = {o.workspace_id: o for o in await store.overrides(now=now)}
    day = now.date().isoformat()
    for workspace_id in sorted(
        set(settings.workspaces) | {settings.smtp.workspace} | set(overrides)
    ):
        limits = settings.workspace(workspace_id).limits
        if workspace_id in overrides:
            limits = overrides[workspace_id].apply(limits)
        used = await store.quota_used(workspace_id, day)
        flag = (
            f" (override until {overrides[workspace_id].expires_at.isoformat()}Z)"
            if workspace_id in overrides
            else ""
        )
        print(f"{workspace_id}{flag}")
        print(f"  burst {limits.rate_limit_burst}, refill {limits.rate_limit_refill}/s")
        print(f"  workspace_daily {_limit(limits.workspace_daily)}, used {used.get('*', 0)}")
        print(f"  per_user_daily {_limit(limits.per_user_daily)}")
    return 0


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _describe_override(override: object) -> str:
    fields = (
        "workspace_id",
        "workspace_daily",
        "per_user_daily",
        "rate_limit_burst",
        "rate_limit_refill",
        "expires_at",
    )
    return json.dumps({f: getattr(override, f) for f in fields}, default=str)


async def _audit(store: SqlStore, limit: int) -> int:
    await store.migrate()
    for entry in await store.audit_entries(limit=limit):
        print(json.dumps(entry, default=_json_default))
    return 0


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(coro)
    except StoreUnavailable as exc:
        print(f"smtp-relay: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


async def _serve(settings: Settings, config_text: str | None) -> int:
    from relay.processes import multiprocess_metrics, prepare_metrics_dir, tag_logs

    if settings.process_count > 1 or multiprocess_metrics():
        # Before relay.service imports the metrics: prometheus_client picks its storage
        # then. A directory given in the environment is emptied of an earlier run's samples.
        prepare_metrics_dir()
    if settings.process_count > 1:
        tag_logs(0)
    from relay.service import RelayService

    service = RelayService(settings, config_text=config_text)
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
