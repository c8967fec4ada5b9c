"""hare's error types. Each message names the file, key or row at fault."""


class HareError(Exception):
    """Base class of every error hare raises on bad input."""


class CheckpointError(HareError):
    """A checkpoint directory, index or safetensors file is missing, malformed or does not fit the model."""


class ConfigError(HareError):
    """config.json is missing, unreadable or describes something hare cannot build."""


class UnsupportedModelError(HareError):
    """The model_type (or GGUF architecture) is not one hare implements."""


class TokenizerError(HareError):
    """Tokenizer files are missing or unreadable."""


class TemplateError(HareError):
    """A chat template failed to render or tried to leave the sandbox."""
