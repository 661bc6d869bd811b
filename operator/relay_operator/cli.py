"""`smtp-relay-operator`: run the operator, or print the CRDs it serves.

smtp-relay-operator run     # the operator (settings from RELAY_OPERATOR_* variables)
smtp-relay-operator crds    # the CustomResourceDefinitions, as YAML on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket
import sys

import kopf
from pydantic.fields import FieldInfo

from relay_operator import __version__, crdgen
from relay_operator.kube import Kube
from relay_operator.settings import OperatorSettings, configure_kopf, priority


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp-relay-operator",
        description="Kubernetes operator for smtp-relay (SmtpRelay, RelayProvider).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run the operator against the cluster of $KUBECONFIG or the pod's account",
        epilog="Settings: "
        + "; ".join(
            f"RELAY_OPERATOR_{name.upper()} ({info.description}{_default(info)})"
            for name, info in OperatorSettings.model_fields.items()
        ),
    )
    run.add_argument("--verbose", action="store_true", help="debug logging")
    commands.add_parser("crds", help="print the CustomResourceDefinitions as YAML")
    return parser


def _default(info: FieldInfo) -> str:
    """What the help says of a setting's default: nothing for none."""
    if info.is_required() or info.default is None or info.default == "":
        return ""
    return f" Default: {info.default}."


def identity() -> str:
    """This process among its peers: the pod's name (or host) plus a random suffix."""
    where = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{where}-{os.getpid()}-{secrets.token_hex(3)}"


def quiet_libraries() -> None:
    """httpx logs every request's full URL at INFO (and more at DEBUG). A webhook or
    Prometheus address may carry credentials in its userinfo or query string, and those
    must never reach a log: only warnings from the HTTP client, verbose or not."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(settings: OperatorSettings, *, verbose: bool = False) -> None:
    from relay_operator import handlers  # registers the handlers with kopf

    log_format = kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=verbose, log_format=log_format)
    quiet_libraries()
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings)
    context = handlers.Context(
        kube=Kube.from_environment(
            timeout_s=settings.request_timeout_s, concurrency=settings.api_concurrency
        ),
        settings=settings,
        identity=identity(),
        priority=priority(),
    )
    asyncio.run(
        kopf.operator(
            clusterwide=True,
            settings=kopf_settings,
            memo=kopf.Memo(context=context),
            identity=context.identity,  # type: ignore[arg-type]
            priority=context.priority,
            peering_name=settings.peering,
            standalone=settings.peering is None,
            liveness_endpoint=settings.liveness_endpoint,
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "crds":
        sys.stdout.write("---\n".join(crdgen.render().values()))
        return 0
    run(OperatorSettings(), verbose=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
