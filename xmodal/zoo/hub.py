"""``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` for xmodal models, through ``huggingface_hub``.

:class:`HubMixin` is ``huggingface_hub``'s :class:`~huggingface_hub.PyTorchModelHubMixin` with the zoo's folder
format (:mod:`xmodal.zoo.registry`): ``model.safetensors``, ``config.json`` (``class_path`` + ``init_args``),
``card.yaml`` and the ``README.md`` model card (:mod:`xmodal.zoo.card`). The hub mixin would build
``config.json`` from the ``__init__`` arguments it can serialise, and silently drop the rest (a teacher module, a
nested config object); the zoo's format rebuilds a model from the ``init_args`` it records instead, and checks
the class and the weights' sha256 before building anything. So :class:`HubMixin` overrides the save and load
hooks and keeps the mixin's ``push_to_hub`` (``create_repo`` + ``upload_folder`` of a saved folder) and its
model-card metadata (``library_name``, ``tags``).

A model's card facts (teacher, recipe, data, budget, metrics, licence) come from the card it was loaded with
(``create_model`` keeps it as ``zoo_card``), updated by ``model_card_kwargs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from huggingface_hub import ModelCard, PyTorchModelHubMixin

from xmodal.zoo.card import LIBRARY_NAME, MODEL_CARD_TEMPLATE, TAGS, render_model_card
from xmodal.zoo.registry import create_model, save_pretrained

CARD_FACTS = ("name", "teacher", "teacher_sha256", "metrics", "recipe", "data", "budget", "license")


class HubMixin(PyTorchModelHubMixin, library_name=LIBRARY_NAME, tags=list(TAGS),
               model_card_template=MODEL_CARD_TEMPLATE):
    """Mix into a model class that records its constructor arguments as ``self.init_args`` (plain JSON)."""

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | Path, *, config: Any = None, repo_id: str | None = None,
        push_to_hub: bool = False, model_card_kwargs: dict[str, Any] | None = None, **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write the zoo folder (``config`` is ignored: ``config.json`` holds ``init_args``); optionally push it.

        ``model_card_kwargs`` updates the card facts (:data:`CARD_FACTS`, e.g. ``{"license": "apache-2.0"}``).
        """
        self._save_folder(Path(save_directory), model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        self._save_folder(save_directory, None)

    def _save_folder(self, folder: Path, model_card_kwargs: dict[str, Any] | None) -> None:
        init_args = getattr(self, "init_args", None)
        if init_args is None:
            raise TypeError(f"{type(self).__name__} records no init_args: save_pretrained cannot rebuild it")
        facts = {**self.card_facts(), **(model_card_kwargs or {})}
        unknown = sorted(set(facts) - set(CARD_FACTS))
        if unknown:
            raise TypeError(f"unknown model card fields {unknown}; the card takes {list(CARD_FACTS)}")
        save_pretrained(self, init_args, folder, **facts)  # type: ignore[arg-type]

    def card_facts(self) -> dict[str, Any]:
        """The card facts of the card this model was loaded with (empty for a model built in code)."""
        card: dict[str, Any] = getattr(self, "zoo_card", None) or {}
        return {key: card[key] for key in CARD_FACTS if card.get(key) is not None}

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        card = {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", **self.card_facts(), **kwargs}
        return ModelCard(render_model_card(card))

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
        token: str | bool | None = None, cache_dir: str | Path | None = None, local_files_only: bool = False,
        revision: str | None = None, **overrides: Any,
    ) -> Self:
        """Load a zoo folder, or a Hub repository holding one (downloaded as ``snapshot_download`` does).

        ``overrides`` replace constructor arguments, as in :func:`~xmodal.zoo.create_model`. The model is in
        eval mode.
        """
        source = Path(pretrained_model_name_or_path).expanduser()
        if not source.is_dir():
            from huggingface_hub import snapshot_download

            source = Path(snapshot_download(
                str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir,
                force_download=force_download, token=token, local_files_only=local_files_only,
            ))
        model = create_model(str(source), **overrides)
        if not isinstance(model, cls):
            raise TypeError(f"{pretrained_model_name_or_path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model
