"""Classification datasets in ImageNet-style class folders: ``SRC/{train,val,test}/<class folder>/<image>``.

Classes are the class folders of every split, sorted by folder name (``label`` is the index), as ImageNet's
``n01440764 ...`` order and :func:`xmodal.data.eval_sets.scan_image_folder` have it. A folder's class name is its
name with ``_`` as spaces, or, with ``--class-names``, what that file gives it: ``<folder> <name>`` per line
(ImageNet's ``LOC_synset_mapping.txt``, CoOp's ``classnames.txt``) or a JSON object ``{"<folder>": "<name>"}``.

Each image is one sample, in the fields of the classification corpora (:mod:`xmodal.data.corpora.fashion_mnist`):
``jpg``/``png``/``webp`` (the image, checked by decoding it; kept as it is unless ``--max-image-size`` shrinks it),
``txt`` (the first prompt template filled with the class name, the caption a CLIP recipe trains on) and ``json``
(``label``, ``class_name``, ``class_folder``, ``image``: the path below the split folder).

Side files, as the generated corpora write them: ``classes.json`` (``classes`` in label order and the zero-shot
``templates``, what ``xmodal eval zeroshot --classes`` and the recipes' ``ZeroShotTask`` read), ``split.json`` (the
base-to-novel split of :func:`xmodal.eval.base2novel.make_split`: the first half of the classes base, the rest
novel, what ``xmodal eval base2novel --split`` and the prompt-distillation recipes read) and ``tokenizer/`` (a word
tokenizer covering every prompt).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmodal.data.convert.base import Conversion, ConvertError, Sample, read_json, read_lines, sample_key
from xmodal.data.convert.images import is_image_file, read_image

SPLITS = ("train", "val", "test")
TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a drawing of a {}.",
)
DEFAULT_CONTEXT_LENGTH = 32


@dataclass(frozen=True)
class ImageJob:
    """One image of a class folder: the file, its sample key, label, class name and folder."""

    image: str
    key: str
    label: int
    class_name: str
    class_folder: str
    relative: str


def class_sample(job: ImageJob, template: str = TEMPLATES[0], max_size: int | None = None) -> Sample:
    """The shard sample of ``job`` (fields in the module docstring)."""
    field, data = read_image(Path(job.image), max_size)
    meta = {"label": job.label, "class_name": job.class_name, "class_folder": job.class_folder,
            "image": job.relative}
    return {"__key__": job.key, field: data, "txt": template.format(job.class_name), "json": meta}


def image_sources(job: ImageJob) -> list[Path]:
    return [Path(job.image)]


def read_class_names(path: Path) -> dict[str, str]:
    """Folder -> class name from a JSON object, or from ``<folder> <name>`` lines (``#`` comments, blank lines
    ignored); :class:`ConvertError` naming the file (and line) when it is neither."""
    if path.suffix.lower() == ".json":
        names = read_json(path)
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise ConvertError(f"{path}: expected a JSON object of class folder -> class name")
        return {str(k): v.strip() for k, v in names.items()}
    names = {}
    for number, line in read_lines(path, "class names file"):
        if line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ConvertError(f"{path}:{number}: expected '<class folder> <class name>', got {line!r}")
        names[parts[0]] = parts[1].strip()
    return names


def class_folders(src: Path, splits: Sequence[str]) -> list[str]:
    """The class folder names of every split folder, sorted."""
    folders = {d.name for split in splits for d in (src / split).iterdir() if d.is_dir()}
    if not folders:
        raise ConvertError(f"{src}: no class folders in {', '.join(splits)} (expected SPLIT/<class>/<image>)")
    return sorted(folders)


def folder_jobs(split_dir: Path, folders: Sequence[str], names: Mapping[str, str]) -> list[ImageJob]:
    """The images of one split folder, class by class in label order, files sorted by name."""
    jobs = []
    for label, folder in enumerate(folders):
        class_dir = split_dir / folder
        if not class_dir.is_dir():
            continue
        for file in sorted(f for f in class_dir.iterdir() if is_image_file(f)):
            jobs.append(ImageJob(str(file), sample_key(folder, file.stem), label, names[folder], folder,
                                 f"{folder}/{file.name}"))
    return jobs


def _write_side_files(classes: Sequence[str], templates: Sequence[str], context_length: int,
                      out: Path) -> dict[str, Any]:
    from xmodal.eval.base2novel import make_split, write_split
    from xmodal.modalities.text import build_word_tokenizer

    (out / "classes.json").write_text(json.dumps({"classes": list(classes), "templates": list(templates)}, indent=1))
    split = make_split(classes)
    write_split(split, out / "split.json")
    build_word_tokenizer([t.format(c) for c in classes for t in templates], out / "tokenizer",
                         context_length=context_length)
    return {"classes": "classes.json", "num_classes": len(classes), "split": "split.json",
            "base_classes": [classes[i] for i in split.base], "tokenizer": "tokenizer",
            "context_length": context_length}


@dataclass(frozen=True)
class ClassFolders:
    """ImageNet-style class folders."""

    name: str = "class-folders"
    help: str = "ImageNet-style class folders: SRC/{train,val,test}/<class>/<image>, --class-names for folder ids"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--splits", nargs="+", metavar="SPLIT",
                            help="split folders to convert (default: whichever of train, val, test SRC holds)")
        parser.add_argument("--class-names", type=Path,
                            help="class names of folders named by id: '<folder> <name>' lines, or a JSON object")
        parser.add_argument("--templates", nargs="+", metavar="TEMPLATE",
                            help="zero-shot prompt templates with a {} placeholder; the first is each sample's txt "
                                 f"(default: {len(TEMPLATES)}, starting {TEMPLATES[0]!r})")
        parser.add_argument("--max-image-size", type=int,
                            help="re-encode images whose shorter side is larger, resized to this (default: keep bytes)")
        parser.add_argument("--context-length", type=int, default=DEFAULT_CONTEXT_LENGTH,
                            help="the tokenizer's context length")

    def build(self, src: Path, args: argparse.Namespace) -> Conversion[ImageJob]:
        splits = args.splits or [split for split in SPLITS if (src / split).is_dir()]
        missing = [split for split in splits if not (src / split).is_dir()]
        if not splits or missing:
            raise ConvertError(f"{src}: no split folder {', '.join(missing or SPLITS)} (expected SPLIT/<class>/...)")
        folders = class_folders(src, splits)
        names = read_class_names(args.class_names) if args.class_names else {f: f.replace("_", " ") for f in folders}
        unnamed = [folder for folder in folders if folder not in names]
        if unnamed:
            raise ConvertError(f"{args.class_names}: no class name for the folders {', '.join(unnamed[:5])}"
                               + (f" and {len(unnamed) - 5} more" if len(unnamed) > 5 else ""))
        templates = list(args.templates or TEMPLATES)
        if not all("{}" in t for t in templates):
            raise ConvertError(f"--templates: every template needs a {{}} placeholder, got {templates}")
        classes = [names[folder] for folder in folders]
        jobs = {split: folder_jobs(src / split, folders, names) for split in splits}
        options = {"splits": splits, "class_names": str(args.class_names) if args.class_names else None,
                   "templates": templates, "max_image_size": args.max_image_size,
                   "context_length": args.context_length}
        sample = functools.partial(class_sample, template=templates[0], max_size=args.max_image_size)
        side_files = functools.partial(_write_side_files, classes, templates, args.context_length)
        return Conversion(self.name, jobs, sample, image_sources, options, side_files)


CONVERTERS = [ClassFolders()]
