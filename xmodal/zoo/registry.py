"""Model zoo: self-contained checkpoint folders, model cards, and a timm-style ``create_model``.

A checkpoint is a folder::

    model.safetensors   the model's state_dict (safetensors only: loading never unpickles)
    config.json         {"class_path": ..., "init_args": {...}}, as Lightning CLI writes a model
    card.yaml           name, class_path, init_args, bundled, checkpoint, sha256, teacher, metrics, created
    tokenizer/          files that init args point to, copied in (see below)

Bundled files: every top-level string init arg that names an existing file or folder when the checkpoint is
saved (``CLIPStudent``'s ``tokenizer`` folder, say) is copied into the checkpoint folder under the arg's name,
rewritten to that relative path, and listed in the card's ``bundled``. On loading, exactly those args (and the
checkpoint file) are resolved against the card's ``root``, which defaults to the card's own folder, so a
checkpoint folder can be moved or shared as is. Strings that are not existing paths (an open_clip tokenizer
name such as ``"ViT-B-32"``) are kept as they are; nested values (inside dicts) are never treated as paths.

Registry: names are card file stems, looked up in ``xmodal/zoo/*.yaml`` (shipped with the package) and in the
user zoo, ``$XMODAL_ZOO_DIR`` or ``~/.cache/xmodal/zoo`` (user cards win a name clash).
:func:`register_model` writes a copy of a checkpoint's card there with ``root`` set to the checkpoint folder.
A card's ``root`` and ``checkpoint`` may use ``~`` and ``$VARS``.

This module imports only the standard library at import time; torch, safetensors and yaml load on use.
"""

from __future__ import annotations

import copy
import datetime
import fnmatch
import hashlib
import importlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

CARD = "card.yaml"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ZOO_DIR_ENV = "XMODAL_ZOO_DIR"
SHIPPED_DIR = Path(__file__).resolve().parent
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class ChecksumError(RuntimeError):
    """A checkpoint file's sha256 differs from the one its card records."""


def user_zoo_dir() -> Path:
    """The folder of user-registered cards: ``$XMODAL_ZOO_DIR`` or ``~/.cache/xmodal/zoo``."""
    return Path(os.environ.get(ZOO_DIR_ENV) or "~/.cache/xmodal/zoo").expanduser()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def save_pretrained(
    model: nn.Module,
    init_args: dict[str, Any],
    out_dir: str | Path,
    *,
    name: str | None = None,
    teacher: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a self-contained checkpoint folder (see the module docstring).

    Args:
        model: the module to save; its class must be importable by ``class_path``.
        init_args: the constructor arguments that rebuild ``model``'s architecture (JSON-serialisable).
        out_dir: the checkpoint folder, created if needed.
        name: the card's name; defaults to the folder name.
        teacher: what the model was distilled from, for the card.
        metrics: evaluation results for the card (numbers, or tensors/numpy scalars).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    init_args, bundled = _bundle(_plain(init_args), out)
    # a model built by a helper class (e.g. inheriting from a teacher) may declare the plain class that rebuilds it
    class_path = getattr(model, "zoo_class_path", None) or f"{type(model).__module__}.{type(model).__qualname__}"
    _compact_storages(model)
    save_model(model, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps({"class_path": class_path, "init_args": init_args}, indent=2) + "\n")
    from xmodal import __version__

    card = {
        "name": name or out.resolve().name,
        "class_path": class_path,
        "init_args": init_args,
        "bundled": bundled,
        "checkpoint": WEIGHTS,
        "sha256": sha256_file(out / WEIGHTS),
        "teacher": teacher,
        "metrics": _plain(metrics or {}),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "xmodal_version": __version__,
    }
    _write_card(card, out / CARD)
    return out


def create_model(name_or_path: str, pretrained: bool = True, **overrides: Any) -> nn.Module:
    """Build a model from the zoo, timm-style.

    Args:
        name_or_path: a registered name (see :func:`list_models`), or a path to a checkpoint folder or card
            file. An existing path wins over a name.
        pretrained: load the weights (after checking their sha256); ``False`` builds the architecture only.
        **overrides: constructor arguments replacing the card's ``init_args`` (shallow: a dict replaces a dict).

    Raises:
        ValueError: unknown name (the message lists the available ones), or a card without weights.
        ChecksumError: the weights file does not match the card's sha256.
    """
    card, root, _ = _locate(name_or_path)
    init_args = _resolve_bundled(card, root)
    init_args.update(overrides)
    model = _import(card["class_path"])(**init_args)
    if pretrained:
        _load_weights(model, card, root, name_or_path)
    return model


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the shipped and user-registered cards, optionally filtered by an fnmatch ``pattern``."""
    names = sorted(_card_files())
    return fnmatch.filter(names, pattern) if pattern else names


def model_card(name_or_path: str) -> dict[str, Any]:
    """A card's content, plus ``root`` (resolved) and ``card_path``."""
    card, root, card_path = _locate(name_or_path)
    return {**card, "root": str(root), "card_path": str(card_path)}


def register_model(checkpoint_dir: str | Path, name: str | None = None) -> Path:
    """Register a checkpoint folder in the user zoo, so that ``create_model(name)`` finds it.

    Writes ``<user zoo>/<name>.yaml``: a copy of the folder's card whose ``root`` is the folder's absolute
    path (so the folder must stay where it is; re-register after moving it). Re-registering a name replaces it.

    Args:
        checkpoint_dir: a folder written by :func:`save_pretrained`.
        name: the registry name; defaults to the card's name.

    Returns:
        The written card file.
    """
    folder = Path(checkpoint_dir).expanduser().resolve()
    card = _read_card(folder / CARD)
    name = name or card.get("name") or folder.name
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits and _ . + - (no path separators)")
    if not (folder / card.get("checkpoint", WEIGHTS)).is_file():
        raise FileNotFoundError(f"{folder}: no weights file {card.get('checkpoint', WEIGHTS)!r}")
    card.update(name=name, root=str(folder))
    zoo = user_zoo_dir()
    zoo.mkdir(parents=True, exist_ok=True)
    return _write_card(card, zoo / f"{name}.yaml")


def _card_files() -> dict[str, Path]:
    cards = {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}
    zoo = user_zoo_dir()
    if zoo.is_dir():
        cards.update({p.stem: p for p in sorted(zoo.glob("*.yaml"))})
    return cards


def _locate(name_or_path: str) -> tuple[dict[str, Any], Path, Path]:
    """The card for a name or path, the folder its relative paths resolve against, and the card file."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        card_path = path / CARD
        if not card_path.is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint folder: it has no {CARD}")
    elif path.is_file() and path.suffix in (".yaml", ".yml"):
        card_path = path
    else:
        cards = _card_files()
        if name_or_path not in cards:
            available = ", ".join(sorted(cards)) or "none"
            raise ValueError(
                f"unknown model {name_or_path!r}; available: {available}. Names come from the package's cards and "
                f"from {user_zoo_dir()} (${ZOO_DIR_ENV}); a path to a checkpoint folder also works."
            )
        card_path = cards[name_or_path]
    card_path = card_path.resolve()
    card = _read_card(card_path)
    root = card_path.parent
    if card.get("root"):
        root = root / Path(os.path.expandvars(card["root"])).expanduser()  # an absolute root replaces the folder
    return card, root, card_path


def _read_card(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"no model card at {path}")
    card = yaml.safe_load(path.read_text())
    if not isinstance(card, dict) or "class_path" not in card:
        raise ValueError(f"{path} is not a model card: it needs at least class_path and init_args")
    card.setdefault("init_args", {})
    return card


def _write_card(card: dict[str, Any], path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def _resolve_bundled(card: dict[str, Any], root: Path) -> dict[str, Any]:
    init_args = copy.deepcopy(card["init_args"])
    for key in card.get("bundled") or []:
        init_args[key] = str(root / init_args[key])
    return init_args


def _bundle(init_args: dict[str, Any], out: Path) -> tuple[dict[str, Any], list[str]]:
    """Copy the files/folders that top-level string init args name into ``out``; rewrite them as relative paths."""
    bundled = []
    for key, value in init_args.items():
        if not isinstance(value, str) or not value or not Path(value).expanduser().exists():
            continue
        src = Path(value).expanduser().resolve()
        if src.is_dir() and out.resolve().is_relative_to(src):
            raise ValueError(f"init arg {key}={value!r} is a folder that contains the checkpoint folder {out}")
        rel = key + (src.suffix if src.is_file() else "")
        dst = (out / rel).resolve()
        if dst != src:  # re-saving a loaded checkpoint into its own folder: already there
            if dst.is_dir():
                shutil.rmtree(dst)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        init_args[key] = rel
        bundled.append(key)
    return init_args, bundled


def _compact_storages(model: nn.Module) -> None:
    """Give each tensor that uses only part of its storage a storage of its own.

    safetensors refuses such tensors; e.g. ``torch.hann_window`` (inside torchaudio's spectrogram) returns a view of
    a window one sample longer. Tensors that share one whole storage (tied weights) are left alone.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor.data = tensor.data.clone()


def _load_weights(model: nn.Module, card: dict[str, Any], root: Path, name: str) -> None:
    from safetensors.torch import load_model

    if not card.get("checkpoint"):
        raise ValueError(f"model {name!r} has no checkpoint in its card; use pretrained=False for the architecture")
    file = root / Path(os.path.expandvars(card["checkpoint"])).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model {name!r}: weights file {file} does not exist")
    expected = card.get("sha256")
    if not expected:
        raise ChecksumError(f"model {name!r}: its card records no sha256 for {file}; refusing unverified weights")
    got = sha256_file(file)
    if got != expected:
        raise ChecksumError(f"model {name!r}: sha256 mismatch for {file}: expected {expected}, got {got}")
    device = next((p.device for p in model.parameters()), "cpu")
    load_model(model, file, strict=True, device=str(device))


def _import(class_path: str) -> Any:
    module_name, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ImportError(f"cannot import class_path {class_path!r}: {e}") from e


def _plain(obj: Any) -> Any:
    """``obj`` as plain JSON types (tuples become lists; tensor and numpy scalars become numbers)."""

    def default(x: Any) -> Any:
        if hasattr(x, "item"):
            return x.item()
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        raise TypeError(f"{type(x).__name__} {x!r} is not JSON-serialisable; a checkpoint card needs plain values")

    return json.loads(json.dumps(obj, default=default))
