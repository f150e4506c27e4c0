"""The model zoo: checkpoint folders with model cards, and ``create_model`` by name or path.

See :mod:`xmodal.zoo.registry` for the checkpoint format, the store and where cards are looked up,
:mod:`xmodal.zoo.card` for the ``README.md`` model card, and :mod:`xmodal.zoo.hub` for the students'
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (not imported here: it loads ``huggingface_hub``).
"""

from xmodal.zoo.registry import (
    ChecksumError,
    UntrustedCardError,
    create_model,
    list_models,
    model_card,
    register_model,
    save_pretrained,
    sha256_file,
    user_zoo_dir,
)

__all__ = [
    "ChecksumError",
    "UntrustedCardError",
    "create_model",
    "list_models",
    "model_card",
    "register_model",
    "save_pretrained",
    "sha256_file",
    "user_zoo_dir",
]
