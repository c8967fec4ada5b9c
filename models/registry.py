"""model_type -> family module. A family module exposes MODEL_TYPES, IGNORED_KEYS, SPLITS and config_flags()."""
from . import llama
from .errors import UnsupportedModelError

FAMILIES = (llama,)
_BY_TYPE = {t: fam for fam in FAMILIES for t in fam.MODEL_TYPES}


def family_for(model_type: str, where: str = "config.json"):
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not supported "
                                    f"(supported: {', '.join(sorted(_BY_TYPE))})") from None
