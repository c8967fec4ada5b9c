"""hare: LoRA / QLoRA finetuning on fused Triton kernels.

The repository root *is* the package: `package_dir={"hare": "."}` maps the import name `hare` onto it, so
`hare.models`, `hare.kernels`, `hare.quant` and `hare.engine` are the folders you see.
"""
from setuptools import setup

SUBPACKAGES = ["engine", "models", "kernels", "quant", "tools"]

setup(
    name="hare",
    version="0.1.0",
    description="A small, exact, fast LoRA/QLoRA finetuning engine on Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"hare": ".", **{f"hare.{p}": p for p in SUBPACKAGES}},
    packages=["hare"] + [f"hare.{p}" for p in SUBPACKAGES],
    package_data={"hare.tools": ["data/*.jsonl"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "numpy",
        "jinja2>=3.1",
    ],
    extras_require={
        # Oracles only: the library never imports these.
        "test": ["pytest", "transformers>=4.56", "accelerate", "gguf>=0.10", "bitsandbytes>=0.45", "peft>=0.15"],
        "gguf": ["gguf>=0.10"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["hare=hare.tools.cli:main"]},
)
