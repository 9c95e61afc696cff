"""`tandem scheduling show | set FILE | reset`: read and change every gateway's scheduling config
live, through the cluster's etcd key (see gateway/scheduling/live_config.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from gateway.scheduling.live_config import delete_scheduling_document, get_scheduling_document, put_scheduling_document, scheduling_key
from gateway.scheduling.scheduling_config import SchedulingConfig, parse_document


def add_parser(sub, default_etcd: str) -> None:
    sched = sub.add_parser("scheduling", help="show or change the gateways' routing policy, weights and thresholds, live")
    sched.add_argument("--etcd", default=default_etcd, help=f"etcd endpoint (default {default_etcd})")
    sched.add_argument("--cluster", default="default", help="cluster name (etcd key prefix)")
    for name, what in (("cert", "client certificate"), ("key", "its private key"), ("ca", "CA that signed etcd's certificate")):
        env = f"TANDEM_TLS_{name.upper()}"
        sched.add_argument(f"--tls-{name}", default=os.environ.get(env, ""), help=f"for --etcd https://...: the {what} (PEM; env {env})")
    sched.add_argument(
        "--etcd-username", default=os.environ.get("TANDEM_ETCD_USERNAME", ""), help="etcd user, for an etcd with auth enabled (env TANDEM_ETCD_USERNAME)"
    )
    sched.add_argument("--etcd-password-file", default=os.environ.get("TANDEM_ETCD_PASSWORD_FILE", ""),
                       help="file holding its password (env TANDEM_ETCD_PASSWORD_FILE; or the password itself in TANDEM_ETCD_PASSWORD)")  # fmt: skip
    # refused, never a prefix of --etcd-password-file (argparse abbreviations would echo it as a file name)
    sched.add_argument("--etcd-password", dest="etcd_password_on_argv", default=None, help=argparse.SUPPRESS)
    actions = sched.add_subparsers(dest="scheduling_command", required=True)
    show = actions.add_parser("show", help="the document in etcd and the config it makes over the defaults")
    show.set_defaults(func=cmd_show)
    put = actions.add_parser("set", help="validate a TOML/JSON document and store it; every gateway applies it within a moment")
    put.add_argument("file", help="a scheduling document ('-' reads stdin)")
    put.set_defaults(func=cmd_set)
    reset = actions.add_parser("reset", help="delete the document: gateways return to their own settings")
    reset.set_defaults(func=cmd_reset)


def _etcd(args, coro):
    """Run one etcd call with a deadline; an unreachable etcd is a clear error, not a traceback."""
    from services.common.etcd_auth import credentials_from_config, explain_refusal, set_client_credentials
    from services.common.etcd_tls import set_client_tls
    from services.common.tls import TlsFiles

    try:
        if args.etcd_password_on_argv is not None:
            raise ValueError(
                "--etcd-password: a password on the command line is visible to every user (ps, /proc); use --etcd-password-file or TANDEM_ETCD_PASSWORD"
            )
        set_client_tls(TlsFiles.from_config(args))  # ValueError (shown as an error) when only some are given
        set_client_credentials(credentials_from_config(args))  # ValueError naming the setting
        return asyncio.run(asyncio.wait_for(coro, 10))
    except ValueError:
        coro.close()  # never awaited when the settings were refused
        raise
    except (TimeoutError, Exception) as e:  # noqa: BLE001 - aetcd raises several kinds
        refusal = explain_refusal(e, args.etcd, f"use {args.cluster}'s scheduling key")
        if refusal is not None:  # a wrong password or missing permission: say what to fix
            raise refusal from None
        raise SystemExit(f"tandem: error: cannot reach etcd at {args.etcd} ({type(e).__name__}: {e}); pass --etcd HOST:PORT") from None


def cmd_show(args) -> int:
    text = _etcd(args, get_scheduling_document(args.etcd, args.cluster))
    key = scheduling_key(args.cluster)
    if text is None:
        print(f"# {key} is not set: gateways use their own settings (--routing-policy, --scheduling-config)")
        return 0
    print(f"# {key}:\n{text.rstrip()}\n# the config it makes over the defaults (a gateway merges it over its own settings):")
    print(SchedulingConfig().merged(parse_document(text)).to_json())
    return 0


def cmd_set(args) -> int:
    text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    config = _etcd(args, put_scheduling_document(args.etcd, args.cluster, text))  # ValueError: nothing written
    print(f"stored at {scheduling_key(args.cluster)}: policy {config.policy}, picker {config.picker}")
    return 0


def cmd_reset(args) -> int:
    _etcd(args, delete_scheduling_document(args.etcd, args.cluster))
    print(f"deleted {scheduling_key(args.cluster)}")
    return 0
