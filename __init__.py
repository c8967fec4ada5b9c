"""hare: LoRA / QLoRA finetuning on fused Triton kernels, exact to the reference models.

    import hare
    model = hare.load_model("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="float32")
    tok = hare.load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    print(hare.generate(model, tok, "What is the capital of France?", chat=True))
"""
from .engine import (CUDAGraphStep, DataError, LoRAConfig, TrainConfig, TrainResult, apply_lora,
                     disable_checkpointing, enable_checkpointing, load_adapter, merge, prepare, save_adapter, train)
from .engine.generate import generate, generate_ids
from .models import (CausalLM, CausalLMOutput, CheckpointError, ConfigError, HareError, ModelConfig,
                     TemplateError, TokenizerError, UnsupportedModelError, load_model, save_model)
from .models.gguf import convert_gguf
from .models.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
