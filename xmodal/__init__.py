"""xmodal: cross-modal knowledge distillation with one Lightning module and YAML recipes."""

from xmodal._version import __version__
from xmodal.zoo import create_model, list_models, register_model  # stdlib-only at import; torch loads on use

__all__ = ["__version__", "create_model", "list_models", "register_model"]
