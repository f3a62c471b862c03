"""The ``roma-otel`` command line: ``demo``, ``report EXECUTION_ID``, ``db upgrade|downgrade|current`` and ``serve``."""

from __future__ import annotations

import argparse
import sys

from roma_otel.config import ConfigError
from roma_otel.report import DEFAULT_SLOWEST
from roma_otel.version import __version__


def _demo(args: argparse.Namespace) -> int:
    from roma_otel.demo.run import run_demo

    return run_demo(
        goal=args.goal,
        model=args.model,
        offline=not args.live,
        max_depth=args.max_depth,
        use_async=args.use_async,
        host=args.host,
        port=args.port,
        keep_serving=args.keep_serving,
        url=args.url,
        postgres=not args.no_postgres,
        repeat=args.repeat,
        interval=args.interval,
    )


def _report(args: argparse.Namespace) -> int:
    try:
        from roma_otel.report import DatabaseUnavailableError, ExecutionNotFoundError, fetch_report
        from roma_otel.storage.migrate import resolve_database_url
    except ImportError as exc:
        print(f"roma-otel: error: {exc}; install roma-otel[postgres]", file=sys.stderr)
        return 2
    try:
        text = fetch_report(resolve_database_url(args.url), args.execution_id, slowest=args.slowest)
    except ExecutionNotFoundError as exc:
        print(f"roma-otel: error: {exc}", file=sys.stderr)
        return 1
    except DatabaseUnavailableError as exc:
        print(f"roma-otel: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _db(args: argparse.Namespace) -> int:
    try:
        from alembic.util import CommandError
        from sqlalchemy.exc import SQLAlchemyError

        from roma_otel.storage import migrate
    except ImportError as exc:
        print(f"roma-otel: error: {exc}; install roma-otel[postgres]", file=sys.stderr)
        return 2
    try:
        if args.db_command == "upgrade":
            migrate.upgrade(args.url, args.revision)
        elif args.db_command == "downgrade":
            migrate.downgrade(args.url, args.revision)
        rev = migrate.current(args.url)
    except (CommandError, SQLAlchemyError) as exc:
        print(f"roma-otel: error: {exc}", file=sys.stderr)
        return 1
    if rev is None:
        print("base (no roma-otel migrations applied)")
    else:
        print(f"{rev} (head)" if rev == migrate.head() else rev)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import ipaddress
    import os

    try:
        import uvicorn

        from roma_otel.api import TOKEN_ENV, OtlpSettings, create_app
        from roma_otel.api.app import SERVE_SETTINGS_ENV, serve_settings
        from roma_otel.storage.migrate import resolve_database_url
    except ImportError as exc:
        print(f"roma-otel: error: {exc}; install roma-otel[api]", file=sys.stderr)
        return 2
    url = resolve_database_url(args.url)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    if token is not None and not token.strip():
        token = None
    try:
        public = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        public = args.host != "localhost"
    if public and token is None:
        print(
            f"roma-otel: warning: serving on {args.host} without authentication; set {TOKEN_ENV} or --token",
            file=sys.stderr,
        )
    otlp = None
    if not args.no_otlp:
        try:
            defaults = OtlpSettings()
            otlp = OtlpSettings(
                **{
                    name: _flag_or_env(getattr(args, f"otlp_{name}"), env, getattr(defaults, name))
                    for name, env in OTLP_ENV.items()
                }
            )
        except ValueError as exc:
            print(f"roma-otel: error: {exc}", file=sys.stderr)
            return 2
    try:
        workers = _flag_or_env(args.workers, WORKERS_ENV, 1)
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
    except ValueError as exc:
        print(f"roma-otel: error: {exc}", file=sys.stderr)
        return 2
    if workers == 1:
        app = create_app(url, token=token, otlp=otlp)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        return 0
    # Several processes, each with its own GIL, database pool and OTLP writer: uvicorn starts them from an
    # import string, so each rebuilds the app from the settings resolved here.
    os.environ[SERVE_SETTINGS_ENV] = serve_settings(url, token, otlp)
    uvicorn.run(
        "roma_otel.api.app:app_from_environment",
        factory=True,
        workers=workers,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
    )
    return 0


WORKERS_ENV = "ROMA_OTEL_SERVE_WORKERS"  # `serve --workers`
# The receiver's settings: `serve --otlp-max-body-bytes` and so on, or these variables.
OTLP_ENV = {
    "max_body_bytes": "ROMA_OTEL_OTLP_MAX_BODY_BYTES",
    "max_queued_spans": "ROMA_OTEL_OTLP_MAX_QUEUED_SPANS",
    "connections": "ROMA_OTEL_OTLP_CONNECTIONS",
}


def _flag_or_env(value: int | None, env: str, default: int) -> int:
    """A flag's value, else its environment variable's, else the default."""
    import os

    if value is not None:
        return value
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{env} must be an integer, got {raw!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roma-otel", description="OpenTelemetry for DSPy and ROMA agents.")
    parser.add_argument("--version", action="version", version=f"roma-otel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a ROMA-style agent offline and show its telemetry")
    demo.add_argument("--goal", help="the goal to solve (default: a Barcelona weekend plan)")
    demo.add_argument("--model", help="model name, e.g. openai/gpt-4o-mini (default: gpt-4o-mini, offline)")
    demo.add_argument("--live", action="store_true", help="call the real model (needs its API key)")
    demo.add_argument("--max-depth", type=int, default=2, help="maximum task-tree depth (default 2)")
    demo.add_argument("--async", dest="use_async", action="store_true", help="run the async solver")
    demo.add_argument("--host", default="127.0.0.1", help="Prometheus endpoint host (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=9464, help="Prometheus endpoint port (default 9464, 0 = any)")
    demo.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run the agent N times (metrics accumulate, so Prometheus sees rates); the report shows the last run",
    )
    demo.add_argument("--interval", type=float, default=0.0, metavar="SECONDS", help="pause between repeated runs")
    demo.add_argument(
        "--keep-serving",
        type=float,
        nargs="?",
        const=0.0,
        default=None,
        metavar="SECONDS",
        help="keep the metrics endpoint (and a throwaway PostgreSQL) up after the run "
        "(for SECONDS, or until Ctrl-C without a value)",
    )
    demo.add_argument(
        "--url",
        help="persist the run into this database, postgresql://... (default: $ROMA_OTEL_DATABASE_URL, "
        "$DATABASE_URL, then storage.postgres.connection_url from the config file; with none, a throwaway "
        "local server when PostgreSQL is installed)",
    )
    demo.add_argument("--no-postgres", action="store_true", help="do not persist the run into PostgreSQL")
    demo.set_defaults(func=_demo)

    db = sub.add_parser("db", help="migrate the PostgreSQL schema (roma-otel's packaged Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    url_help = (
        "database URL, postgresql://... (default: $ROMA_OTEL_DATABASE_URL, $DATABASE_URL, "
        "then storage.postgres.connection_url from the config file)"
    )
    upgrade = db_sub.add_parser("upgrade", help="upgrade to REV (default: head) and print the new revision")
    upgrade.add_argument("revision", nargs="?", default="head", metavar="REV", help="target revision (default head)")
    downgrade = db_sub.add_parser("downgrade", help="downgrade to REV (base removes every table)")
    downgrade.add_argument("revision", metavar="REV", help="target revision, e.g. 003_add_dag_snapshot or base")
    current = db_sub.add_parser("current", help="print the database's current revision")
    for command in (upgrade, downgrade, current):
        command.add_argument("--url", help=url_help)
        command.set_defaults(func=_db)

    serve = sub.add_parser("serve", help="serve the REST API over the PostgreSQL tables (FastAPI + uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--url", help=url_help)
    serve.add_argument(
        "--token",
        help="require `Authorization: Bearer TOKEN` on every endpoint but /health "
        "(default: $ROMA_OTEL_API_TOKEN; prefer the variable, command lines are visible to other users)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default info)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"server processes (default 1; or ${WORKERS_ENV}): each has its own database connections and "
        "OTLP writer, so N processes decode and translate OTLP spans on N cores",
    )
    serve.add_argument(
        "--no-otlp", action="store_true", help="do not accept OTLP/HTTP traces at POST /v1/traces (on by default)"
    )
    for name, env, what in (
        ("max-body-bytes", OTLP_ENV["max_body_bytes"], "largest request body, decompressed (default 16 MiB)"),
        ("max-queued-spans", OTLP_ENV["max_queued_spans"], "spans being written before answering 503 (default 20000)"),
        ("connections", OTLP_ENV["connections"], "database connections writing OTLP spans (default 2)"),
    ):
        serve.add_argument(f"--otlp-{name}", type=int, metavar="N", help=f"OTLP receiver: {what}; or ${env}")
    serve.set_defaults(func=_serve)

    report = sub.add_parser("report", help="print an execution's tree, cost and slowest tool calls from PostgreSQL")
    report.add_argument("execution_id", metavar="EXECUTION_ID", help="the execution to show")
    report.add_argument("--url", help=url_help)
    report.add_argument(
        "--slowest",
        type=_count,
        default=DEFAULT_SLOWEST,
        metavar="N",
        help=f"how many of the slowest tool calls to list (default {DEFAULT_SLOWEST})",
    )
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, OSError) as exc:
        print(f"roma-otel: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
