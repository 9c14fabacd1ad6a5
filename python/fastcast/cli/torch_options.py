"""Options shared by the commands that read torch.save files."""

from __future__ import annotations

import argparse


def add_torch_options(
    parser: argparse.ArgumentParser,
    key_default: str,
    prefix_default: str | None = None,
) -> None:
    """--state-dict-key and --strip-prefix, for commands reading torch.save files."""
    parser.add_argument(
        "--state-dict-key",
        metavar="KEY",
        help=f"torch.save checkpoints: the key holding the state dict (default: {key_default})",
    )
    default = f" (default: {prefix_default})" if prefix_default else ""
    parser.add_argument(
        "--strip-prefix",
        metavar="PREFIX",
        help="torch.save checkpoints: remove PREFIX (e.g. module., as DDP adds) from tensor "
        f"names{default}",
    )
