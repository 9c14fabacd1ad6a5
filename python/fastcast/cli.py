"""The ``fastcast`` command: argument parsing and printing only; calls the API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import fastcast


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcast",
        description="Re-type and re-shard safetensors checkpoints, bit-exact with PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"fastcast {fastcast.__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show a traceback when something fails"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    dtypes = commands.add_parser(
        "dtypes",
        help="list the dtypes fastcast knows and the names it accepts",
        description="List every safetensors dtype, the names fastcast accepts for it, "
        "and whether fastcast casts it; then the CPU kernel paths available here.",
    )
    dtypes.set_defaults(run=run_dtypes)
    return parser


def run_dtypes(args: argparse.Namespace) -> int:
    rows = [("dtype", "torch", "casts", "other names")]
    for d in fastcast.dtypes():
        rows.append(
            (
                d["name"],
                d["torch_name"],
                "yes" if d["castable"] else "copied as is",
                ", ".join(d["aliases"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip())
    kernels = fastcast.available_kernels()
    print(f"\nkernels on this CPU: {', '.join(kernels)} (using {fastcast.select_kernel()})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code: int = args.run(args)
        return code
    except KeyboardInterrupt:
        print("fastcast: interrupted", file=sys.stderr)
        return 130
    except (fastcast.FastcastError, OSError, ValueError) as e:
        if args.debug:
            raise
        print(f"fastcast: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
