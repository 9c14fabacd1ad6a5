"""``fastcast dtypes``: the dtypes fastcast knows, and the kernels here."""

from __future__ import annotations

import argparse

import fastcast


def add_dtypes(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dtypes = commands.add_parser(
        "dtypes",
        help="list the dtypes fastcast knows and the names it accepts",
        description="List every safetensors dtype, the names fastcast accepts for it, "
        "and whether fastcast casts it; then the CPU kernel paths available here.",
    )
    dtypes.set_defaults(run=run_dtypes)


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
