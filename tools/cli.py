"""The `hare` command: `hare convert`, `hare generate`, `hare train`, `hare merge`."""
import argparse
import sys


def _convert(args):
    from ..models.gguf import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype)
    print(f"wrote {out}")


def _generate(args):
    from .. import generate, load_model, load_tokenizer

    model = load_model(args.model, dtype=args.dtype, device=args.device, revision=args.revision,
                       load_in_4bit=args.load_in_4bit)
    if args.adapter:
        from ..engine.checkpoint import load_adapter

        load_adapter(model, args.adapter)
    tok = load_tokenizer(args.model, revision=args.revision)
    stream = (lambda i, text: print(text, end="", flush=True)) if not args.no_stream else None
    for prompt in args.prompt:
        text = generate(model, tok, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, chat=args.chat, stream=stream, seed=args.seed)
        print() if stream else print(text)


def _train(args, cfg):
    from ..engine.train import train
    from ..models import load_model
    from ..models.tokenizer import load_tokenizer

    device = args.device or ("cuda" if _cuda() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model = load_model(args.model, dtype=dtype, device=device, revision=args.revision,
                       load_in_4bit=args.load_in_4bit)
    tok = load_tokenizer(args.model, revision=args.revision)
    result = train(model, tok, args.data, cfg, eval_data=args.eval_data)
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    evals = f", eval loss {result.eval_losses[-1][1]:.4f}" if result.eval_losses else ""
    print(f"trained {result.steps} steps in {result.seconds:.0f} s (last loss {last}{evals}); "
          f"adapter: {result.adapter_dir}")


def _merge(args):
    import os
    import shutil

    from ..engine.checkpoint import load_adapter
    from ..engine.lora import merge
    from ..models import load_model, resolve_checkpoint, save_model

    # the original 16-bit weights (not a 4-bit copy): merge is W + s B A on them
    model = load_model(args.model, dtype=args.dtype, device=args.device, revision=args.revision)
    load_adapter(model, args.adapter)
    save_model(merge(model), args.out)
    # tokenizer and generation files travel along, so that the merged directory is a complete checkpoint
    base = resolve_checkpoint(args.model, args.revision)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja", "chat_template.json"):
        if os.path.isfile(os.path.join(base, name)):
            shutil.copy(os.path.join(base, name), os.path.join(args.out, name))
    print(f"wrote {args.out}")


def _cuda():
    import torch

    return torch.cuda.is_available()


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
    g.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to apply")
    g.add_argument("--load-in-4bit", action="store_true", help="quantize the base to NF4 while loading")
    g.set_defaults(fn=_generate)

    t = sub.add_parser("train", allow_abbrev=False,
                       help="train a LoRA adapter: --model PATH --data FILE.jsonl [--key=value ...]",
                       description="Any TrainConfig field is an option (--lr=1e-4, --max_steps=200, --lora.r=8, "
                                   "--lora.targets=q_proj,v_proj, ...); unknown options are errors.")
    t.add_argument("--model", required=True, help="checkpoint directory or hub id")
    t.add_argument("--data", required=True, help="JSONL file of chat / instruction / text records")
    t.add_argument("--eval-data", default=None, help="held-out JSONL (default: --eval_fraction of --data)")
    t.add_argument("--revision", default=None)
    t.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    t.add_argument("--device", default=None)
    t.add_argument("--load-in-4bit", action="store_true", help="QLoRA: quantize the base to NF4 while loading")
    t.set_defaults(fn=_train)

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base -> 16-bit HF checkpoint")
    m.add_argument("--model", required=True, help="the base checkpoint directory or hub id (16-bit weights)")
    m.add_argument("--adapter", required=True, help="PEFT adapter directory (hare's or peft's)")
    m.add_argument("--out", required=True)
    m.add_argument("--revision", default=None)
    m.add_argument("--dtype", default=None, help="default: the checkpoint's dtype")
    m.add_argument("--device", default=None)
    m.set_defaults(fn=_merge)

    args, extra = p.parse_known_args(argv)
    if extra and args.cmd != "train":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    from ..models.errors import HareError

    try:
        if args.cmd == "train":
            from ..engine.train import config_from_args

            try:
                cfg = config_from_args(extra)  # typed; unknown keys are errors
            except ValueError as e:
                print(f"hare train: {e}", file=sys.stderr)
                return 2
            args.fn(args, cfg)
        else:
            args.fn(args)
    except HareError as e:
        print(f"hare {args.cmd}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
