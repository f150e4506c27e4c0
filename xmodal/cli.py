"""The ``xmodal`` console script.

* ``xmodal fit|validate|test|predict --config recipe.yaml``: Lightning's CLI over :class:`Distiller` and
  :class:`WdsDataModule`; students, teachers, losses and modalities are chosen by ``class_path`` (short class
  names work for everything imported here).
* ``xmodal data make NAME --out DIR``: build an offline corpus.
* ``xmodal cache --config cache.yaml``: run a teacher over shards once and store its outputs in new shards.
* ``xmodal eval zeroshot|retrieval ...``: benchmark a checkpoint or zoo model.
* ``xmodal compress --config stages.yaml``: progressive multi-stage compression (TinyCLIP automatic inheritance).
* ``xmodal search-student --teacher ... --candidates ... --data ...``: rank student architectures without training
  (DisWOT).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

# Imported so that jsonargparse knows the classes by their short names in configs.
import xmodal.losses  # noqa: F401
import xmodal.modalities.audio  # noqa: F401
import xmodal.modalities.bev  # noqa: F401
import xmodal.modalities.image  # noqa: F401
import xmodal.modalities.text  # noqa: F401
import xmodal.modalities.video  # noqa: F401
import xmodal.students.autoinherit  # noqa: F401
import xmodal.students.av  # noqa: F401
import xmodal.students.clip  # noqa: F401
import xmodal.students.inherit  # noqa: F401
import xmodal.students.staged  # noqa: F401
import xmodal.teachers.cached  # noqa: F401
import xmodal.teachers.hf  # noqa: F401
import xmodal.teachers.multi  # noqa: F401
import xmodal.teachers.open_clip  # noqa: F401
import xmodal.teachers.sentence  # noqa: F401
from xmodal.data.wds import WdsDataModule
from xmodal.distiller import ConfigKeyError, Distiller

DESCRIPTION = (
    "Cross-modal knowledge distillation. Training verbs below are Lightning's; xmodal also has: "
    "`xmodal data make NAME --out DIR`, `xmodal cache --config ...`, `xmodal eval zeroshot|retrieval ...`, "
    "`xmodal compress --config ...`, `xmodal search-student ...` (each with --help)."
)


class XmodalCLI(LightningCLI):
    """LightningCLI with xmodal's defaults; ``seed_everything`` is on by default for reproducible runs."""


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
    elif args and args[0] == "cache":
        from xmodal.data.cache import cache_main

        cache_main(args[1:])
    elif args and args[0] == "compress":
        from xmodal.progressive import progressive_main

        progressive_main(args[1:])
    elif args and args[0] == "search-student":
        from xmodal.search import search_main

        search_main(args[1:])
    elif args and args[0] == "eval":
        from xmodal.eval.cli import eval_main

        eval_main(args[1:])
    else:
        run_lightning(args)


if __name__ == "__main__":
    main()
