"""The ``fastcast`` command: the parser, and one line per failure on stderr."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

import fastcast
from fastcast._errors import one_line, resume_hint
from fastcast.cli.convert import add_convert
from fastcast.cli.dtypes import add_dtypes
from fastcast.cli.inspect import add_inspect
from fastcast.cli.merge import add_merge
from fastcast.cli.verify import add_verify


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
    add_convert(commands)
    add_merge(commands)
    add_inspect(commands)
    add_verify(commands)
    add_dtypes(commands)
    # --debug is accepted after the command too (fastcast convert ... --debug).
    for sub in commands.choices.values():
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings as one line each on stderr, like errors (no source line)."""
    print(f"fastcast: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = show_warning
    if getattr(args, "quiet", False):
        # Quiet drops the "this cast could overflow" notice, never the "it did".
        warnings.filterwarnings("ignore", category=fastcast.RangeRiskWarning)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code: int = args.run(args)
        return code
    except KeyboardInterrupt as e:
        print(f"fastcast: interrupted; nothing was put in place{resume_hint(e)}", file=sys.stderr)
        return 130
    except (fastcast.FastcastError, OSError, ValueError) as e:
        if args.debug:
            raise
        print(f"fastcast: error: {describe_error(e)}{resume_hint(e)}", file=sys.stderr)
        return 1


def describe_error(e: BaseException) -> str:
    """One line naming the file and the problem: ``out/x: No space left on device``."""
    return one_line(e)
