"""Model zoo: self-contained checkpoint folders, model cards, and a timm-style ``create_model``.

A checkpoint is a folder::

    model.safetensors   the model's state_dict (safetensors only: loading never unpickles)
    config.json         {"class_path": ..., "init_args": {...}}, as Lightning CLI writes a model
    card.yaml           name, class_path, init_args, bundled, checkpoint, sha256, teacher, metrics, created,
                        and what the run recorded of itself: recipe, data, budget, license
    README.md           the model card for people and the Hugging Face Hub (:mod:`xmodal.zoo.card`)
    tokenizer/          files that init args point to, copied in (see below)

Bundled files: every top-level string init arg that names an existing file or folder when the checkpoint is
saved (``CLIPStudent``'s ``tokenizer`` folder, say) is copied into the checkpoint folder under the arg's name,
rewritten to that relative path, and listed in the card's ``bundled``. On loading, exactly those args (and the
checkpoint file) are resolved against the card's ``root``, which defaults to the card's own folder, so a
checkpoint folder can be moved or shared as is. Strings that are not existing paths (an open_clip tokenizer
name such as ``"ViT-B-32"``) are kept as they are; nested values (inside dicts) are never treated as paths.

Registry: names are card file stems, looked up in ``xmodal/zoo/*.yaml`` (shipped with the package) and in the
user zoo, ``$XMODAL_ZOO_DIR`` or ``~/.cache/xmodal/zoo`` (user cards win a name clash).
:func:`register_model` copies a checkpoint folder's files into the zoo's store, ``store/<sha256 of the files>/``,
and writes a copy of its card beside the store with ``root`` set to that copy, so a registered model does not depend
on the folder it came from. A card's ``root`` and ``checkpoint`` may use ``~`` and ``$VARS``; a card whose root
folder has gone fails with "folder missing". The folder of a model on the Hugging Face Hub is named
``hf://<owner>/<name>[@<revision>]``; it is read from the local Hugging Face cache unless the caller passes
``download=True``.

Trust: a card is data, never code. Before anything is imported or built, :func:`create_model` checks

* ``class_path`` against an allow-list: classes of this package (``xmodal.``...) and of the modules named by the
  entry points of the ``xmodal.plugins`` group (a plug-in's module and its submodules). Anything else
  (``subprocess.check_call``, ``os.system``...) is refused unimported; once imported, the object must be a
  ``torch.nn.Module`` subclass defined under those prefixes.
* ``card_sha256``: the sha256 of the canonical JSON of the card's ``class_path``, ``init_args``, ``bundled``,
  ``checkpoint`` and ``sha256``, written by :func:`save_pretrained` and :func:`register_model`. It catches a card
  edited after saving; it is a checksum, not a signature (whoever can write a card can recompute it), so the
  allow-list is what keeps a hostile card from running code. Cards without it are refused, except the cards
  shipped inside the package; :func:`register_model` adds it to an older checkpoint's card, which is how a user
  vouches for one.
* the weights' ``sha256``, read before the model is built.

Refusals raise :class:`UntrustedCardError` (a ``ValueError``) or :class:`ChecksumError`. A card written before
its class moved still loads, from the new home, with a warning (:mod:`xmodal.zoo.moved`).

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

from xmodal.zoo.card import render_model_card
from xmodal.zoo.moved import current_class_path

if TYPE_CHECKING:
    from torch import nn

CARD = "card.yaml"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
README = "README.md"
STORE = "store"
HUB_SCHEME = "hf://"
ZOO_DIR_ENV = "XMODAL_ZOO_DIR"
SHIPPED_DIR = Path(__file__).resolve().parent
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
PLUGIN_GROUP = "xmodal.plugins"
SEALED_FIELDS = ("class_path", "init_args", "bundled", "checkpoint", "sha256")


class ChecksumError(RuntimeError):
    """A checkpoint file's sha256 differs from the one its card records."""


class UntrustedCardError(ValueError):
    """A model card names a class outside the allow-list, or its content does not match its ``card_sha256``."""


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
    teacher_sha256: str | None = None,
    recipe: str | list[str] | None = None,
    data: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
    license: str | None = None,
) -> Path:
    """Write ``model`` as a self-contained checkpoint folder (see the module docstring) with its ``README.md``.

    Args:
        model: the module to save; its class must be importable by ``class_path``.
        init_args: the constructor arguments that rebuild ``model``'s architecture (JSON-serialisable).
        out_dir: the checkpoint folder, created if needed.
        name: the card's name; defaults to the folder name.
        teacher: what the model was distilled from, for the card; a ``local-dir:`` or plain path that exists is
            written absolute.
        metrics: evaluation results for the card (numbers, or tensors/numpy scalars).
        teacher_sha256: the teacher's weights digest, for the card.
        recipe: the config file(s) of the run. data: the shards it trained (and validated) on.
        budget: its steps, epochs, batch size... license: the licence the weights are released under.
            These describe the run in the card and ``README.md``; what is not given reads "not recorded".

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
    from xmodal._version import __version__

    card = {
        "name": name or out.resolve().name,
        "class_path": class_path,
        "init_args": init_args,
        "bundled": bundled,
        "checkpoint": WEIGHTS,
        "sha256": sha256_file(out / WEIGHTS),
        "card_sha256": "",  # set below; placed here so the file shows it beside sha256
        "teacher": _teacher_reference(teacher),
        "teacher_sha256": teacher_sha256,
        "recipe": recipe,
        "data": _plain(data),
        "budget": _plain(budget),
        "license": license,
        "metrics": _plain(metrics or {}),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "xmodal_version": __version__,
    }
    card["card_sha256"] = card_digest(card)
    _write_card(card, out / CARD)
    (out / README).write_text(render_model_card(card))
    return out


def create_model(name_or_path: str, pretrained: bool = True, download: bool = False, **overrides: Any) -> nn.Module:
    """Build a model from the zoo, timm-style, in eval mode (``.train()`` it to fine-tune).

    Args:
        name_or_path: a registered name (see :func:`list_models`), a path to a checkpoint folder or card file, or
            a Hugging Face repository ``hf://<owner>/<name>[@<revision>]`` holding such a folder. An existing path
            wins over a name.
        pretrained: load the weights (after checking their sha256); ``False`` builds the architecture only.
        download: let an ``hf://`` model download; by default it must already be in the local Hugging Face cache.
        **overrides: constructor arguments replacing the card's ``init_args`` (shallow: a dict replaces a dict).

    The model keeps its card as ``zoo_card``, so that saving it again (``save_pretrained``, ``push_to_hub``)
    keeps the run's teacher, data and metrics.

    Raises:
        ValueError: unknown name (the message lists the available ones), or a card without weights.
        FileNotFoundError: a registered model's folder is gone, or an ``hf://`` model is not cached.
        UntrustedCardError: the card names a class outside the allow-list, or was changed after saving.
        ChecksumError: the weights file does not match the card's sha256.
    """
    card, root, card_path = _locate(name_or_path, download)
    _verify_card(card, card_path)  # over the class_path as written, before a moved one is read from its new home
    cls = _model_class(current_class_path(card["class_path"], card_path), card_path)
    weights = _verified_weights(card, root, name_or_path) if pretrained else None
    init_args = _resolve_bundled(card, root)
    init_args.update(overrides)
    model = cls(**init_args)
    if weights is not None:
        from safetensors.torch import load_model

        device = next((p.device for p in model.parameters()), "cpu")
        load_model(model, weights, strict=True, device=str(device))
    model.zoo_card = {key: value for key, value in card.items() if key != "root"}  # type: ignore[assignment]
    return model.eval()


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the shipped and user-registered cards, optionally filtered by an fnmatch ``pattern``."""
    names = sorted(_card_files())
    return fnmatch.filter(names, pattern) if pattern else names


def model_card(name_or_path: str) -> dict[str, Any]:
    """A card's content, plus ``root`` (resolved) and ``card_path``."""
    card, root, card_path = _locate(name_or_path)
    return {**card, "root": str(root), "card_path": str(card_path)}


def register_model(checkpoint_dir: str | Path, name: str | None = None, download: bool = False) -> Path:
    """Register a checkpoint folder in the user zoo, so that ``create_model(name)`` finds it.

    The folder's weights, config, cards and bundled files are copied into the zoo's store,
    ``<user zoo>/store/<digest>/`` (content-addressed: the sha256 over the copied files' paths and contents; the
    weights' sha256 is checked against the card after the copy), and ``<user zoo>/<name>.yaml`` gets a copy of
    the folder's card pointing there, so the original folder may move or go. Re-registering a name replaces it.
    A card with a ``card_sha256`` must match it; one without (saved by an older version) gets one, registering
    being the user's word that the folder is trusted.

    Args:
        checkpoint_dir: a folder written by :func:`save_pretrained`, or ``hf://<owner>/<name>[@<revision>]``.
        name: the registry name; defaults to the card's name.
        download: let an ``hf://`` model download; by default it must already be in the local Hugging Face cache.

    Returns:
        The written card file.

    Raises:
        UntrustedCardError: the card names a class outside the allow-list, or was changed after saving.
        ChecksumError: the copied weights do not match the card's sha256.
    """
    source = str(checkpoint_dir)
    folder = hub_folder(source, download) if source.startswith(HUB_SCHEME) else Path(source).expanduser().resolve()
    card = _read_card(folder / CARD)
    _check_class_path(card["class_path"], folder / CARD)
    if "card_sha256" in card:
        _verify_card(card, folder / CARD)
    else:
        card["card_sha256"] = card_digest(card)
    name = name or card.get("name") or folder.name
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits and _ . + - (no path separators)")
    if not (folder / card.get("checkpoint", WEIGHTS)).is_file():
        raise FileNotFoundError(f"{folder}: no weights file {card.get('checkpoint', WEIGHTS)!r}")
    zoo = user_zoo_dir()
    stored = _store(folder, card, zoo / STORE)
    card.update(name=name, root=str(stored.relative_to(zoo)), source=source)
    return _write_card(card, zoo / f"{name}.yaml")


def hub_folder(reference: str, download: bool = False) -> Path:
    """The local snapshot folder of ``hf://<owner>/<name>[@<revision>]`` (downloaded only when ``download``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = reference.removeprefix(HUB_SCHEME).partition("@")
    if repo_id.count("/") != 1:
        raise ValueError(f"{reference!r}: a Hugging Face model is hf://<owner>/<name>[@<revision>]")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=not download))
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{reference} is not in the local Hugging Face cache; pass download=True to fetch it"
        ) from error


def _store(folder: Path, card: dict[str, Any], store: Path) -> Path:
    """Copy the files ``card`` needs from ``folder`` into ``store/<digest of the copied files>`` (kept if there)."""
    import tempfile

    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=store))
    try:
        names = [card.get("checkpoint", WEIGHTS), CONFIG, CARD, README,
                 *(card["init_args"][key] for key in card.get("bundled") or [])]
        for rel in names:
            src = folder / rel
            if src.is_dir():
                shutil.copytree(src, staging / rel)
            elif src.is_file():
                shutil.copy2(src, staging / rel)
            elif rel != README:
                raise FileNotFoundError(f"{folder}: {rel} is missing; its card needs it")
        got = sha256_file(staging / card.get("checkpoint", WEIGHTS))
        if got != card.get("sha256"):
            raise ChecksumError(f"{folder}: weights sha256 {got} differs from the card's {card.get('sha256')}")
        stored = store / _folder_digest(staging)
        if not stored.is_dir():
            staging.rename(stored)
        return stored
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _folder_digest(folder: Path) -> str:
    """Hex sha256 over a folder's files: each relative path and its content's sha256, in path order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def card_digest(card: dict[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of a card's security-relevant fields (:data:`SEALED_FIELDS`)."""
    sealed = {key: card.get(key) for key in SEALED_FIELDS}
    return hashlib.sha256(json.dumps(sealed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _verify_card(card: dict[str, Any], card_path: Path) -> None:
    recorded = card.get("card_sha256")
    if not recorded:
        if card_path.parent == SHIPPED_DIR:
            return
        raise UntrustedCardError(
            f"model card {card_path} (class_path {card.get('class_path')!r}) records no card_sha256; re-save the "
            f"checkpoint, or register its folder with xmodal.register_model if you trust it"
        )
    if recorded != card_digest(card):
        raise UntrustedCardError(
            f"model card {card_path} (class_path {card.get('class_path')!r}) does not match its card_sha256: "
            f"it was changed after saving"
        )


def _allowed_modules() -> tuple[str, ...]:
    from importlib.metadata import entry_points

    return ("xmodal", *(ep.module for ep in entry_points(group=PLUGIN_GROUP)))


def _is_allowed(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in allowed)


def _check_class_path(class_path: Any, card_path: Path) -> tuple[str, ...]:
    """Refuse, without importing anything, a class_path outside this package and its plug-ins."""
    allowed = _allowed_modules()
    if not (
        isinstance(class_path, str)
        and _DOTTED.match(class_path)
        and "__" not in class_path  # no dunders: `xmodal.__main__` would run on import
        and _is_allowed(class_path.rpartition(".")[0], allowed)
    ):
        raise UntrustedCardError(
            f"model card {card_path}: class_path {class_path!r} is not a model class of xmodal or of a "
            f"registered {PLUGIN_GROUP} plug-in"
        )
    return allowed


def _model_class(class_path: Any, card_path: Path) -> type[nn.Module]:
    from torch import nn

    allowed = _check_class_path(class_path, card_path)
    obj = _import(class_path)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module) and _is_allowed(obj.__module__, allowed)):
        raise UntrustedCardError(
            f"model card {card_path}: class_path {class_path!r} is not a torch.nn.Module class of xmodal or of a "
            f"registered {PLUGIN_GROUP} plug-in"
        )
    return obj


def _card_files() -> dict[str, Path]:
    cards = {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}
    zoo = user_zoo_dir()
    if zoo.is_dir():
        cards.update({p.stem: p for p in sorted(zoo.glob("*.yaml"))})
    return cards


def _locate(name_or_path: str, download: bool = False) -> tuple[dict[str, Any], Path, Path]:
    """The card for a name, path or ``hf://`` id, the folder its relative paths resolve against, and the card file."""
    path = Path(name_or_path).expanduser()
    registered_as = None
    if name_or_path.startswith(HUB_SCHEME):
        card_path = hub_folder(name_or_path, download) / CARD
    elif path.is_dir():
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
        card_path, registered_as = cards[name_or_path], name_or_path
    # the folder is resolved, not the file: a Hugging Face snapshot's files link into its blob store
    card_path = card_path.parent.resolve() / card_path.name
    card = _read_card(card_path)
    root = card_path.parent
    if card.get("root"):
        root = root / Path(os.path.expandvars(card["root"])).expanduser()  # an absolute root replaces the folder
        if not root.is_dir():
            raise FileNotFoundError(f"folder missing: {root} (registered as {registered_as or card_path})")
    return card, root, card_path


def _teacher_reference(teacher: str | None) -> str | None:
    """``teacher`` with a path (plain or ``local-dir:``) that exists made absolute; other names as they are."""
    if not teacher:
        return teacher
    prefix = "local-dir:" if teacher.startswith("local-dir:") else ""
    path = Path(teacher.removeprefix(prefix)).expanduser()
    return f"{prefix}{path.resolve()}" if path.exists() else teacher


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


def _verified_weights(card: dict[str, Any], root: Path, name: str) -> Path:
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
    return file


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
