"""The training engine: LoRA adapters (lora.py), data (data.py), the loop (train.py), checkpoints and PEFT adapter
I/O (checkpoint.py), gradient checkpointing with CPU offload (offload.py), a training step replayed from a CUDA
graph (graph.py), generation (generate.py)."""
from .checkpoint import load_adapter, load_checkpoint, save_adapter, save_checkpoint
from .data import DataError, prepare
from .graph import CUDAGraphStep
from .lora import LoRAConfig, LoRALinear, LoRALinear4bit, apply_lora, merge
from .offload import disable_checkpointing, enable_checkpointing
from .train import TrainConfig, TrainResult, evaluate, train
