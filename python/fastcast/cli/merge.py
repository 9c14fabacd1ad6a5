"""``fastcast merge BASE ADAPTER``: ``convert BASE --merge-lora ADAPTER``, spelled as a
command of its own so that ``--help`` lists it."""

from __future__ import annotations

import argparse

from fastcast._core import QUANTIZE_SCHEMES
from fastcast.cli.convert import add_run_options, run_convert
from fastcast.cli.torch_options import add_torch_options
from fastcast.options import DEFAULT_SHARD_SIZE


def add_merge(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    merge = commands.add_parser(
        "merge",
        help="merge a LoRA adapter into its base (convert --merge-lora)",
        description="Merge a PEFT LoRA or DoRA adapter into its base model, shard by shard\n"
        "in bounded memory, as PEFT's merge_and_unload does: each merged weight computed\n"
        "in fp32 (or wider) and rounded once, in the base's dtype unless --dtype says\n"
        "otherwise; the adapter's modules_to_save tensors and tokenizer files replace the\n"
        "base's. The same as: fastcast convert BASE --merge-lora ADAPTER [options].",
        epilog="examples:\n"
        "  fastcast merge base/ adapter/ -o merged/\n"
        "  fastcast merge base/ adapter/ -o merged/ --dtype bf16 --shard-size 5GB\n"
        "  fastcast merge qlora-nf4-base/ adapter/ -o merged/ --dequantize --dtype bf16\n"
        "  fastcast merge base/ adapter/ -o merged-fp8/ --quantize fp8   # merged, then fp8\n"
        "  fastcast merge fp8-base/ adapter/ -o out/ --dequantize --dtype bf16 --quantize fp8\n"
        "  fastcast merge org/base org/adapter -o merged/     # repo ids, from the HF cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("base", help="the base model: a folder, a weights file or a repo id")
    merge.add_argument(
        "adapter",
        help="the adapter: a folder with adapter_config.json and adapter_model.safetensors "
        "(or .bin), or a repo id in the local Hugging Face cache",
    )
    merge.add_argument(
        "--dtype", "-d", help="the output's dtype (default: each tensor keeps the base's)"
    )
    merge.add_argument("--output", "-o", help="output folder (default: as for convert)")
    merge.add_argument(
        "--shard-size", default=DEFAULT_SHARD_SIZE, help=f"as for convert ({DEFAULT_SHARD_SIZE})"
    )
    merge.add_argument("--threads", type=int, help="worker threads (default: all cores)")
    merge.add_argument(
        "--keep", action="append", default=[], metavar="PATTERN", help="as for convert"
    )
    merge.add_argument(
        "--dequantize",
        action="store_true",
        help="for a quantized base (bitsandbytes, fp8, GPTQ, AWQ, MXFP4, NVFP4, "
        "compressed-tensors int): merge into its weights dequantized in fp32 (needs --dtype)",
    )
    merge.add_argument(
        "--quantize",
        choices=QUANTIZE_SCHEMES,
        help="quantize the merged decoder Linear weights to fp8 in the same pass, as "
        "convert --quantize does (the merge rounded once to f32, then quantized); the other "
        "tensors keep the base's dtype or go to --dtype; a quantized base (--dequantize) is "
        "dequantized, merged and quantized again in one pass",
    )
    add_torch_options(merge, "as for convert")
    add_run_options(merge)
    merge.set_defaults(
        run=run_merge, variant=None, keep_quantized=False, jobs=None, executor="local",
        ray_address=None,
    )  # fmt: skip


def run_merge(args: argparse.Namespace) -> int:
    args.model, args.merge_lora = [args.base], args.adapter
    return run_convert(args)
