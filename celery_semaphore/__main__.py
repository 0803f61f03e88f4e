"""``celery-semaphore`` / ``python -m celery_semaphore``: the command-line entry point."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(prog="celery-semaphore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a real worker and the tick through a gate of 4")
    demo.add_argument("--calls", type=int, default=40, help="calls to submit (default 40)")
    demo.add_argument("--limit", type=int, default=4, help="size of the gate (default 4)")
    demo.add_argument("--redis-url", default=None, help="use this Redis instead of finding one")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(calls=args.calls, limit=args.limit, redis_url=args.redis_url)
    return 2


if __name__ == "__main__":
    sys.exit(main())
