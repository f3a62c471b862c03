"""The ``roma-otel`` command line: ``roma-otel demo`` (more subcommands arrive with the storage bridges)."""

from __future__ import annotations

import argparse
import sys

from roma_otel.config import ConfigError
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
    )


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
    demo.add_argument(
        "--port", type=int, default=9464, help="Prometheus endpoint port (default 9464, 0 = any)"
    )
    demo.add_argument(
        "--keep-serving",
        type=float,
        nargs="?",
        const=0.0,
        default=None,
        metavar="SECONDS",
        help="keep the metrics endpoint up after the run (for SECONDS, or until Ctrl-C without a value)",
    )
    demo.set_defaults(func=_demo)
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
