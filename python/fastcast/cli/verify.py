"""``fastcast verify``: prove a converted folder right against its source."""

from __future__ import annotations

import argparse

import fastcast
from fastcast.cli.torch_options import add_torch_options


def add_verify(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verify = commands.add_parser(
        "verify",
        help="prove a converted folder right against its source, with torch",
        description="Check a converted folder against the folder it came from. Structure:\n"
        "every source tensor present once with the expected shape and dtype, index and\n"
        "shards agree, config.json's dtype matches, no stray or half-written files.\n"
        "Values: each output tensor is loaded with torch on the GPU(s) (else the CPU) and\n"
        "compared bit for bit with torch's own .to(dtype) of the source tensor.\n"
        "Exits 1 when anything is wrong. Needs torch and safetensors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("output", help="the converted folder (or .safetensors file)")
    verify.add_argument(
        "--against",
        help="the model it was converted from (default: the source its fastcast.json names)",
    )
    verify.add_argument(
        "--device",
        default="auto",
        help="auto (every GPU, else the CPU), cpu, cuda, or a list like cuda:0,cuda:1",
    )
    verify.add_argument(
        "--dtype", help="the conversion's target (default: from fastcast.json, else inferred)"
    )
    verify.add_argument(
        "--keep",
        action="append",
        metavar="PATTERN",
        help="tensors left in their source dtype, as given to convert (default: from "
        "fastcast.json; needed only for folders converted by something else)",
    )
    verify.add_argument(
        "--variant", metavar="NAME", help="the source variant converted (default: fastcast.json)"
    )
    verify.add_argument(
        "--load",
        action="store_true",
        help="also load the whole model as a user would (transformers, device_map=auto)",
    )
    recorded = "as fastcast.json records, when neither of these two is given"
    add_torch_options(verify, recorded, recorded)
    verify.add_argument("--quiet", "-q", action="store_true", help="print only failures")
    verify.set_defaults(run=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    report = fastcast.verify(
        args.output,
        args.against,
        dtype=args.dtype,
        keep=args.keep,
        variant=args.variant,
        device=args.device,
        load=args.load,
        progress=False if args.quiet else None,
        state_dict_key=args.state_dict_key,
        strip_prefix=args.strip_prefix,
    )
    if not args.quiet or not report.ok:
        print(report.summary())
    return 0 if report.ok else 1
