"""The `hare` command: `hare convert`, `hare generate` (and the training verbs as they land)."""
import argparse
import sys


def _convert(args):
    from ..models.gguf import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype)
    print(f"wrote {out}")


def _generate(args):
    from .. import generate, load_model, load_tokenizer

    model = load_model(args.model, dtype=args.dtype, device=args.device, revision=args.revision)
    tok = load_tokenizer(args.model, revision=args.revision)
    stream = (lambda i, text: print(text, end="", flush=True)) if not args.no_stream else None
    for prompt in args.prompt:
        text = generate(model, tok, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, chat=args.chat, stream=stream, seed=args.seed)
        print() if stream else print(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="hare", description="LoRA / QLoRA finetuning on fused Triton kernels")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="GGUF file -> Hugging Face checkpoint directory")
    c.add_argument("gguf")
    c.add_argument("out_dir")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.set_defaults(fn=_convert)

    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("--model", required=True, help="checkpoint directory or hub id")
    g.add_argument("--revision", default=None)
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--no-stream", action="store_true")
    g.set_defaults(fn=_generate)

    args = p.parse_args(argv)
    from ..models.errors import HareError

    try:
        args.fn(args)
    except HareError as e:
        print(f"hare {args.cmd}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
