from .config import ModelConfig, config_from_dict, load_config
from .decoder import CausalLM, CausalLMOutput, KVCache
from .errors import (CheckpointError, ConfigError, HareError, TemplateError, TokenizerError,
                     UnsupportedModelError)
from .weights import load_model, resolve_checkpoint, save_model
