"""model_type -> family module. A family module exposes MODEL_TYPES, IGNORED_KEYS, RENAMES, SPLITS and
config_flags(hf, where); one that takes the text tower of a multimodal wrapper config also has text_tower(hf, where)."""
from . import gemma, llama, mistral, phi, qwen
from .errors import UnsupportedModelError

FAMILIES = (llama, mistral, gemma, qwen, phi)
_BY_TYPE = {t: fam for fam in FAMILIES for t in fam.MODEL_TYPES}


def family_for(model_type: str, where: str = "config.json"):
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not supported "
                                    f"(supported: {', '.join(sorted(_BY_TYPE))})") from None
