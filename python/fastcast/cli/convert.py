"""``fastcast convert``: its options, one model or a batch."""

from __future__ import annotations

import argparse
import sys
import warnings

import fastcast
from fastcast._core import QUANTIZE_SCHEMES
from fastcast.cli.torch_options import add_torch_options
from fastcast.options import DEFAULT_SHARD_SIZE, Keywords


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
        "  fastcast convert gptq-model/ --dequantize --dtype bf16 --quantize fp8-channel\n"
        "  fastcast convert base/ --merge-lora adapter/ -o merged/   # in base's dtype\n"
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
    add_merge_options(convert)
    add_run_options(convert)
    add_batch_options(convert)
    convert.set_defaults(run=run_convert)


def add_merge_options(convert: argparse.ArgumentParser) -> None:
    """Merging an adapter into the weights."""
    convert.add_argument(
        "--merge-lora",
        metavar="ADAPTER",
        help="merge a PEFT LoRA or DoRA adapter (a folder with adapter_config.json and "
        "adapter_model.safetensors or .bin, or a repo id in the local cache) into the "
        "weights, as PEFT's merge_and_unload does: each merged weight computed in fp32 "
        "and rounded once to DTYPE (default: the base's dtype, never fp32 for a bf16 "
        "base); modules_to_save tensors replace the base's; a quantized base needs "
        "--dequantize --dtype DTYPE; with --quantize, the merged weights are quantized "
        "in the same pass",
    )


def add_quantized_options(convert: argparse.ArgumentParser) -> None:
    """What becomes of a quantized model, or of a plain one quantized."""
    convert.add_argument(
        "--keep-quantized",
        action="store_true",
        help="for a quantized model (fp8, bitsandbytes, GPTQ, AWQ, compressed-tensors, "
        "gpt-oss MXFP4, ModelOpt NVFP4 and FP8): cast only the tensors that are not quantization "
        "state, keep every packed weight, scale, zero point and quant state byte for byte, "
        "and keep quantization_config (and ModelOpt's hf_quant_config.json; without this, "
        "a quantized model is refused)",
    )
    convert.add_argument(
        "--dequantize",
        action="store_true",
        help="for a quantized model (fp8: DeepSeek/FineGrained blocks, compressed-tensors, "
        "FBGEMM, vLLM, ModelOpt; bitsandbytes 4-bit and LLM.int8; GPTQ; AWQ; "
        "compressed-tensors int4/int8 (pack-quantized, W8A8); MXFP4: gpt-oss, "
        "compressed-tensors; NVFP4: compressed-tensors, ModelOpt): write a plain model in "
        "DTYPE (bf16, fp16 or fp32), each weight computed in fp32 as its format's library "
        "computes it and rounded once; the quantization state, quantization_config and "
        "ModelOpt's hf_quant_config.json are left out",
    )
    convert.add_argument(
        "--quantize",
        choices=QUANTIZE_SCHEMES,
        help="quantize a plain model's decoder Linear weights to fp8 e4m3, one F32 scale "
        "(amax/448) per block: fp8 = 128x128 blocks, weight_scale_inv, the fp8 config "
        "(DeepSeek/FineGrained, vLLM); fp8-channel = one scale per row, weight_scale, "
        "compressed-tensors FP8_DYNAMIC. Embeddings, norms, lm_head, router gates and "
        "biases, and the layers whose shape does not fit the blocks (listed), go to DTYPE "
        "(bf16, fp16 or fp32). A quantized model: with --dequantize, each weight is "
        "dequantized in fp32 and quantized from those values in the same pass",
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


def run_convert(args: argparse.Namespace) -> int:
    if args.verify:
        # Imported here: a conversion without --verify need not load the verifier.
        from fastcast._verify.verify import require_torch

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
    from fastcast._batch.jobs import with_jobs_file  # the batch machinery, only for batches

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
        merge_lora=args.merge_lora,
    )
