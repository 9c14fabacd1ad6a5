"""The ``fastcast`` command: argument parsing and printing only; calls the API."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

import fastcast
from fastcast._batch_jobs import with_jobs_file
from fastcast._core import QUANTIZE_SCHEMES
from fastcast._errors import one_line, resume_hint
from fastcast._verify import require_torch
from fastcast.options import DEFAULT_SHARD_SIZE, Keywords


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
    add_inspect(commands)
    add_verify(commands)
    dtypes = commands.add_parser(
        "dtypes",
        help="list the dtypes fastcast knows and the names it accepts",
        description="List every safetensors dtype, the names fastcast accepts for it, "
        "and whether fastcast casts it; then the CPU kernel paths available here.",
    )
    dtypes.set_defaults(run=run_dtypes)
    # --debug is accepted after the command too (fastcast convert ... --debug).
    for sub in commands.choices.values():
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def add_convert(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    convert = commands.add_parser(
        "convert",
        help="re-type and re-shard a model folder",
        description="Cast the float tensors of a model folder (or one weights file)\n"
        "to DTYPE, bit-exact with torch's tensor.to(), and re-shard them like\n"
        "transformers' save_pretrained, as safetensors. Weights are found at any depth\n"
        "(diffusers' unet/, vae/...): safetensors, or torch.save files (pytorch_model.bin\n"
        "and its shards, adapter_model.bin, a lone .pt/.pth/.ckpt), read without running\n"
        "pickle; where both are present, safetensors win. Without --dtype every tensor\n"
        "keeps its dtype (a .bin model becomes the same model in safetensors). Integer\n"
        "and bool tensors are copied; config.json dtypes are updated; other files are\n"
        "copied, except weights in other formats (onnx/, original/, .gguf...) and\n"
        "variants (model.fp16.safetensors: see --variant).\n"
        "The input is never modified. Everything is written to a hidden staging folder\n"
        "in the output and put in place only when the whole conversion succeeded;\n"
        "fastcast.json in the output records how it was made.",
        epilog="examples:\n"
        "  fastcast convert model/ --dtype bf16 --shard-size 5GB\n"
        "  fastcast convert model/ -o out/ --dtype fp16 --shard-size 2GiB --threads 8\n"
        "  fastcast convert tiny-sd/ --dtype bf16 --variant fp16\n"
        "  fastcast convert model/ --dtype bf16 --quantize fp8\n"
        "  fastcast convert model/ --dtype bf16 --resume      # finish an interrupted run\n"
        "  fastcast convert old-bin-model/                    # .bin -> safetensors, as is\n"
        "  fastcast convert ckpt.pth --strip-prefix module. --dtype bf16\n"
        "  fastcast convert m1/ m2/ m3/ --dtype bf16 -o converted/   # a batch\n"
        "  fastcast convert --jobs jobs.toml --executor ray --ray-address auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument(
        "model",
        nargs="*",
        help="model folder, a single .safetensors or .bin/.pt/.pth/.ckpt file, or a "
        "Hugging Face repo id (org/name[@revision], from the local cache); several make "
        "a batch",
    )
    convert.add_argument(
        "--dtype",
        "-d",
        help="target: bf16, fp16, fp32, fp64, fp8_e4m3, fp8_e5m2 (default: every tensor "
        "keeps its dtype; the output defaults to <model>-safetensors)",
    )
    add_torch_options(convert, "the top level, else state_dict, model, module or model_state_dict")
    convert.add_argument(
        "--output",
        "-o",
        help="output folder (default: <model>-<dtype> beside the input as typed; for a "
        "Hugging Face cache snapshot, ./<repo>-<dtype>)",
    )
    convert.add_argument(
        "--variant",
        metavar="NAME",
        help="convert the NAME variant (model.NAME.safetensors, as diffusers saves fp16 "
        "weights) instead of the plain weights, writing it under the plain names",
    )
    convert.add_argument(
        "--shard-size",
        default=DEFAULT_SHARD_SIZE,
        help="largest shard, in tensor bytes: 5GB = 5*10^9, 2GiB = 2*2^30, or bytes "
        f"(default: {DEFAULT_SHARD_SIZE})",
    )
    convert.add_argument("--threads", type=int, help="worker threads (default: all cores)")
    convert.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave float tensors whose names match this glob in their source dtype "
        "(repeatable), e.g. --keep '*norm*' --keep '*.gate.weight'",
    )
    add_quantized_options(convert)
    add_run_options(convert)
    add_batch_options(convert)
    convert.set_defaults(run=run_convert)


def add_quantized_options(convert: argparse.ArgumentParser) -> None:
    """What becomes of a quantized model, or of a plain one quantized."""
    convert.add_argument(
        "--keep-quantized",
        action="store_true",
        help="for a quantized model (fp8, bitsandbytes, GPTQ, AWQ, compressed-tensors): cast "
        "only the tensors that are not quantization state, keep every packed weight, scale, "
        "zero point and quant state byte for byte, and keep quantization_config (without "
        "this, a quantized model is refused)",
    )
    convert.add_argument(
        "--dequantize",
        action="store_true",
        help="for a quantized model (fp8: DeepSeek/FineGrained blocks, compressed-tensors, "
        "FBGEMM, vLLM; bitsandbytes 4-bit and LLM.int8; GPTQ; AWQ): write a plain model in "
        "DTYPE (bf16, fp16 or fp32), each weight computed in fp32 as its format's library "
        "computes it and rounded once; the quantization state and quantization_config are "
        "left out",
    )
    convert.add_argument(
        "--quantize",
        choices=QUANTIZE_SCHEMES,
        help="quantize a plain model's decoder Linear weights to fp8 e4m3, one F32 scale "
        "(amax/448) per block: fp8 = 128x128 blocks, weight_scale_inv, the fp8 config "
        "(DeepSeek/FineGrained, vLLM); fp8-channel = one scale per row, weight_scale, "
        "compressed-tensors FP8_DYNAMIC. Embeddings, norms, lm_head, router gates and "
        "biases, and the layers whose shape does not fit the blocks (listed), go to DTYPE "
        "(bf16, fp16 or fp32)",
    )


def add_run_options(convert: argparse.ArgumentParser) -> None:
    """How the run writes, checks and reports."""
    convert.add_argument(
        "--strict",
        action="store_true",
        help="refuse to write anything if any value overflows (default: convert and warn)",
    )
    convert.add_argument("--report", metavar="FILE", help="also write the report as JSON")
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous conversion in the output folder; only files a fastcast run "
        "recorded writing (or that this run writes) are replaced, and only once the new "
        "output is complete: a folder holding anything else is refused",
    )
    convert.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted conversion into the same output, reusing the shards it "
        "completed (each checked against its recorded digest); says so and exits 0 if the "
        "output is already finished",
    )
    convert.add_argument(
        "--no-fsync",
        action="store_true",
        help="do not sync shards to disk before renaming them into place (faster, less safe)",
    )
    convert.add_argument(
        "--max-memory",
        help="cap on the conversion buffers, e.g. 256MiB (default: 8 MiB per thread)",
    )
    convert.add_argument(
        "--fp8-overflow",
        choices=["saturate", "nan"],
        default="saturate",
        help="fp8 e4m3fn values past ±448 and ±inf: saturate to ±448 (torch >= 2.14, "
        "default) or become NaN (older torch, ml_dtypes)",
    )
    convert.add_argument(
        "--verify",
        action="store_true",
        help="afterwards, check the output against the input with torch (see 'verify')",
    )
    convert.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar and no summary"
    )


def add_batch_options(convert: argparse.ArgumentParser) -> None:
    batch = convert.add_argument_group(
        "batches",
        # The parser keeps descriptions as written (RawDescriptionHelpFormatter): wrapped here.
        "With several models (or --jobs, or --executor ray), -o names the folder that\n"
        "receives each <name>-<dtype>; one failing model does not stop the others, and a\n"
        "table sums them up (exit 1 if any failed).",
    )
    batch.add_argument(
        "--jobs",
        metavar="FILE",
        help="a TOML file of [[model]] tables (path, and any of dtype, shard_size, keep, "
        "output, dequantize...), top-level keys being defaults for all",
    )
    batch.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="where the shards are written: local (one queue on this machine, default) or "
        "ray (a Ray cluster whose nodes all see the inputs and outputs at the same paths; "
        "pip install 'fastcast[ray]')",
    )
    batch.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster to join (default: RAY_ADDRESS, else a local one)",
    )


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


def run_convert(args: argparse.Namespace) -> int:
    if args.verify:
        require_torch()  # before converting, not after
    if len(args.model) != 1 or args.jobs is not None or args.executor != "local":
        return run_batch(args)
    options = convert_options(args)
    options["output"] = args.output
    options["report"] = args.report
    options["threads"] = args.threads
    options["progress"] = False if args.quiet else None
    report = fastcast.convert(args.model[0], args.dtype, **options)
    if not args.quiet:
        print(report.summary())
    if args.verify:
        checked = fastcast.verify(report.output, progress=False if args.quiet else None)
        if not args.quiet or not checked.ok:
            print(checked.summary())
        return 0 if checked.ok else 1
    return 0


def run_batch(args: argparse.Namespace) -> int:
    jobs, dtype, output_dir, options = with_jobs_file(
        args.model, args.jobs, args.dtype, args.output, convert_options(args)
    )
    # Each model's warnings are in its report, printed with its name.
    warnings.filterwarnings("ignore", category=fastcast.FastcastWarning)
    batch = fastcast.convert_batch(
        jobs,
        dtype,
        output_dir=output_dir,
        executor=args.executor,
        ray_address=args.ray_address,
        threads=args.threads,
        progress=False if args.quiet else None,
        report=args.report,
        **options,
    )
    if not args.quiet:
        print(batch.summary(errors=False), flush=True)
    for failed in batch.failed:
        print(f"fastcast: error: {failed.model}: {failed.error}", file=sys.stderr)
    ok = batch.ok
    if args.verify:
        for r in batch.results:
            if r.status == "converted" and r.output is not None:
                checked = fastcast.verify(r.output, progress=False if args.quiet else None)
                if not args.quiet or not checked.ok:
                    print(checked.summary())
                ok = ok and checked.ok
    return 0 if ok else 1


def convert_options(args: argparse.Namespace) -> Keywords:
    """``convert``'s options as the command line gives them, one model's or every
    model's of a batch (the dtype, output, threads, progress and report aside: a batch
    reads those its own way)."""
    return Keywords(
        shard_size=args.shard_size,
        keep=args.keep,
        variant=args.variant,
        keep_quantized=args.keep_quantized,
        dequantize=args.dequantize,
        quantize=args.quantize,
        strict=args.strict,
        overwrite=args.overwrite,
        resume=args.resume,
        fsync=not args.no_fsync,
        max_memory=args.max_memory,
        fp8_overflow=args.fp8_overflow,
        state_dict_key=args.state_dict_key,
        strip_prefix=args.strip_prefix,
    )


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


if __name__ == "__main__":
    sys.exit(main())
