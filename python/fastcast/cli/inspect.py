"""``fastcast inspect``: a model folder's shards, dtypes and config claims."""

from __future__ import annotations

import argparse

import fastcast
from fastcast.cli.torch_options import add_torch_options


def add_inspect(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="show a model folder's shards, dtypes and config claims",
        description="Read the headers of a model folder (or .safetensors file) and show its "
        "shards, tensor count, bytes, stored dtypes, what config.json claims, and a warning "
        "when they disagree. Reads headers only; writes nothing.",
    )
    inspect.add_argument(
        "model", nargs="+", help="model folder(s), .safetensors or .bin/.pt/.pth/.ckpt file(s)"
    )
    inspect.add_argument(
        "--dtype",
        help="also predict what converting to this dtype would lose (reads every tensor; "
        "writes nothing)",
    )
    inspect.add_argument(
        "--keep", action="append", default=[], metavar="PATTERN", help="as for convert"
    )
    inspect.add_argument("--variant", metavar="NAME", help="as for convert")
    add_torch_options(inspect, "as for convert")
    inspect.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    for i, model in enumerate(args.model):
        if i:
            print()
        print(
            fastcast.inspect(
                model,
                dtype=args.dtype,
                keep=args.keep,
                variant=args.variant,
                state_dict_key=args.state_dict_key,
                strip_prefix=args.strip_prefix,
            ).render()
        )
    return 0
