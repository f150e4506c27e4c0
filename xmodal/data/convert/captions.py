"""Image-caption datasets: COCO caption annotations, Karpathy-split JSON files, and CSV/TSV files of (path, caption).

Each (image, caption) pair is one sample, in the fields of the CLIP recipes' corpora
(:mod:`xmodal.data.corpora.shapes`):

``jpg`` / ``png`` / ``webp``
    the image: its original bytes when it decodes and is within ``--max-image-size``, else re-encoded as JPEG
    (shorter side resized). The recipes resize and crop while decoding.
``txt``
    the caption, as written in the source.
``json``
    ``caption``, ``image`` (the image's path relative to the image root) and what the source says of it
    (``image_id`` and ``caption_id`` for COCO, ``split`` and ``sentence_index`` for Karpathy files, ``row`` for
    CSVs).

``tokenizer/`` is a word tokenizer covering every caption (as ``xmodal data make shapes`` writes one), for
recipes whose student tokenizes with the corpus' words; ``--no-tokenizer`` leaves it out.

img2dataset's output needs no conversion: its shards hold ``jpg``, ``txt`` and ``json`` per sample, which are the
fields above, so point ``data.train`` at them directly.
"""

from __future__ import annotations

import argparse
import csv
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmodal.data.convert.base import Conversion, ConvertError, Sample, SkipSample, read_json, sample_key
from xmodal.data.convert.images import read_image

COCO_SPLITS = {"train": "train", "val": "val"}  # annotation file part -> shard split
KARPATHY_SPLITS = ("train", "val", "test")
PATH_COLUMNS = ("path", "filepath", "image", "file_name", "filename")
CAPTION_COLUMNS = ("caption", "title", "text")
DEFAULT_CONTEXT_LENGTH = 32


@dataclass(frozen=True)
class CaptionJob:
    """One (image, caption) sample: the image file, the caption, the sample key and the ``json`` fields."""

    image: str
    caption: str
    key: str
    meta: tuple[tuple[str, Any], ...] = ()


def caption_sample(job: CaptionJob, max_size: int | None = None) -> Sample:
    """The shard sample of ``job`` (fields in the module docstring)."""
    if not job.caption.strip():
        raise SkipSample(job.image, "empty caption")
    field, data = read_image(Path(job.image), max_size)
    return {"__key__": job.key, field: data, "txt": job.caption, "json": {"caption": job.caption, **dict(job.meta)}}


def caption_sources(job: CaptionJob) -> list[Path]:
    return [Path(job.image)]


def _write_tokenizer(captions: Sequence[str], context_length: int, out: Path) -> dict[str, Any]:
    from xmodal.modalities.text import build_word_tokenizer

    build_word_tokenizer(captions, out / "tokenizer", context_length=context_length)
    return {"tokenizer": "tokenizer", "context_length": context_length}


def caption_conversion(name: str, splits: dict[str, list[CaptionJob]], args: argparse.Namespace,
                       options: Mapping[str, Any]) -> Conversion[CaptionJob]:
    """The conversion of caption jobs, with the common options (image size, tokenizer) from ``args``."""
    captions = sorted({job.caption for jobs in splits.values() for job in jobs})
    side_files = (functools.partial(_write_tokenizer, captions, args.context_length) if args.tokenizer else None)
    common = {"max_image_size": args.max_image_size,
              "tokenizer": args.context_length if args.tokenizer else None}
    return Conversion(name, splits, functools.partial(caption_sample, max_size=args.max_image_size), caption_sources,
                      {**options, **common}, side_files)


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-image-size", type=int,
                        help="re-encode images whose shorter side is larger, resized to this (default: keep bytes)")
    parser.add_argument("--tokenizer", action=argparse.BooleanOptionalAction, default=True,
                        help="write tokenizer/, a word tokenizer covering the captions (default: on)")
    parser.add_argument("--context-length", type=int, default=DEFAULT_CONTEXT_LENGTH,
                        help="the tokenizer's context length")


def _field(path: Path, record: Any, key: str, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise ConvertError(f"{path}: {where} has no {key!r}")
    return record[key]


def _list(path: Path, data: Any, key: str) -> list[Any]:
    value = _field(path, data, key, "the file")
    if not isinstance(value, list):
        raise ConvertError(f"{path}: {key!r} is not a list")
    return value


def _chosen(sentences: list[Any], mode: str) -> list[tuple[int, Any]]:
    return list(enumerate(sentences))[:1] if mode == "first" else list(enumerate(sentences))


# ------------------------------------------------------------------------------------------------------------- COCO


def coco_jobs(annotations: Path, image_dir: Path, captions: str = "each") -> list[CaptionJob]:
    """The jobs of one COCO caption file (``images[].{id,file_name}``, ``annotations[].{image_id,id,caption}``):
    images by file name, each image's captions in annotation order (``captions="first"``: only the first)."""
    data = read_json(annotations)
    files = {}
    for i, image in enumerate(_list(annotations, data, "images")):
        files[_field(annotations, image, "id", f"images[{i}]")] = _field(annotations, image, "file_name",
                                                                          f"images[{i}]")
    by_image: dict[Any, list[tuple[Any, str]]] = {image_id: [] for image_id in files}
    for i, note in enumerate(_list(annotations, data, "annotations")):
        image_id = _field(annotations, note, "image_id", f"annotations[{i}]")
        if image_id not in by_image:
            raise ConvertError(f"{annotations}: annotations[{i}] names image_id {image_id!r}, which is not in 'images'")
        by_image[image_id].append((note.get("id", i), str(_field(annotations, note, "caption", f"annotations[{i}]"))))
    jobs = []
    for image_id in sorted(files, key=files.__getitem__):  # by file name: COCO names are zero-padded ids
        for index, (caption_id, text) in _chosen(by_image[image_id], captions):
            meta = (("image", files[image_id]), ("image_id", image_id), ("caption_id", caption_id))
            jobs.append(CaptionJob(str(image_dir / files[image_id]), text.strip(),
                                   sample_key(Path(files[image_id]).stem, str(index)), meta))
    return jobs


@dataclass(frozen=True)
class CocoCaptions:
    """``SRC/annotations/captions_{train,val}YEAR.json`` with images under ``IMAGES/{train,val}YEAR/``."""

    name: str = "coco"
    help: str = "COCO captions: SRC/annotations/captions_{train,val}2017.json, images in SRC/{train,val}2017/"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--year", default="2017", help="the annotation files' year (2014 or 2017)")
        parser.add_argument("--images", type=Path, help="folder holding {train,val}YEAR/ (default: SRC)")
        parser.add_argument("--captions", choices=("each", "first"), default="each",
                            help="one sample per caption (each, default) or per image with its first caption")
        add_caption_arguments(parser)

    def build(self, src: Path, args: argparse.Namespace) -> Conversion[CaptionJob]:
        image_root = args.images or src
        found = {part: src / "annotations" / f"captions_{part}{args.year}.json" for part in COCO_SPLITS}
        found = {part: path for part, path in found.items() if path.is_file()}
        if not found:
            raise ConvertError(f"{src / 'annotations'}: no captions_{{train,val}}{args.year}.json")
        splits = {COCO_SPLITS[part]: coco_jobs(path, image_root / f"{part}{args.year}", args.captions)
                  for part, path in found.items()}
        return caption_conversion(self.name, splits, args, {"year": args.year, "captions": args.captions})


# -------------------------------------------------------------------------------------------------------- Karpathy


def karpathy_jobs(path: Path, image_root: Path, restval: str = "train",
                  captions: str = "each") -> dict[str, list[CaptionJob]]:
    """The jobs of each split of a Karpathy-split file (``images[].{filepath?,filename,split,sentences[].raw}``);
    ``restval`` images go to the split named by ``restval``, or nowhere for ``"skip"``."""
    splits: dict[str, list[CaptionJob]] = {split: [] for split in KARPATHY_SPLITS}
    for i, image in enumerate(_list(path, read_json(path), "images")):
        where = f"images[{i}]"
        filename = _field(path, image, "filename", where)
        relative = str(Path(image.get("filepath", "")) / filename)
        split = str(_field(path, image, "split", where))
        split = restval if split == "restval" else split
        if split == "skip":
            continue
        sentences = _field(path, image, "sentences", where)
        for index, sentence in _chosen(sentences if isinstance(sentences, list) else [], captions):
            text = str(_field(path, sentence, "raw", f"{where}.sentences[{index}]")).strip()
            meta = (("image", relative), ("split", split), ("sentence_index", index))
            splits.setdefault(split, []).append(
                CaptionJob(str(image_root / relative), text, sample_key(Path(relative).stem, str(index)), meta))
    return {split: jobs for split, jobs in splits.items() if jobs}


@dataclass(frozen=True)
class KarpathyCaptions:
    """A Karpathy-split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``)."""

    name: str = "karpathy"
    help: str = ("a Karpathy-split JSON (SRC: dataset_coco.json / dataset_flickr30k.json), images under --images/"
                 "[filepath/]filename")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--images", type=Path, help="the image root (default: the JSON file's folder)")
        parser.add_argument("--restval", choices=("train", "restval", "skip"), default="train",
                            help="where the 'restval' images go: train (the usual, default), a restval split, or none")
        parser.add_argument("--captions", choices=("each", "first"), default="each",
                            help="one sample per caption (each, default) or per image with its first caption")
        add_caption_arguments(parser)

    def build(self, src: Path, args: argparse.Namespace) -> Conversion[CaptionJob]:
        splits = karpathy_jobs(src, args.images or src.parent, args.restval, args.captions)
        return caption_conversion(self.name, splits, args, {"restval": args.restval, "captions": args.captions})


# ------------------------------------------------------------------------------------------------------------- CSV


def _column(path: Path, columns: Sequence[str], asked: str | None, candidates: Sequence[str], what: str) -> str:
    if asked is not None and asked in columns:
        return asked
    found = next((c for c in candidates if c in columns), None) if asked is None else None
    if found is None:
        wanted = repr(asked) if asked is not None else " or ".join(map(repr, candidates))
        raise ConvertError(f"{path}: no {what} column {wanted} (its columns: {', '.join(columns) or 'none'})")
    return found


def csv_jobs(path: Path, image_root: Path, delimiter: str, path_column: str | None = None,
             caption_column: str | None = None) -> list[CaptionJob]:
    """One job per row of a CSV/TSV file with a header row naming an image path column and a caption column."""
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream, delimiter=delimiter)
            columns = list(reader.fieldnames or [])
            image_key = _column(path, columns, path_column, PATH_COLUMNS, "image path")
            caption_key = _column(path, columns, caption_column, CAPTION_COLUMNS, "caption")
            rows = [(row[image_key], row[caption_key]) for row in reader]
    except FileNotFoundError as error:
        raise ConvertError(f"{path}: file not found") from error
    except (UnicodeDecodeError, csv.Error) as error:
        raise ConvertError(f"{path}: not a readable CSV ({error})") from error
    return [CaptionJob(str(image_root / (image or "")), (caption or "").strip(), f"{row:09d}",
                       (("image", image), ("row", row)))
            for row, (image, caption) in enumerate(rows)]


@dataclass(frozen=True)
class CsvCaptions:
    """A CSV or TSV file with a header: an image path column and a caption column (open_clip's ``filepath`` /
    ``title`` layout among them)."""

    name: str = "captions-csv"
    help: str = "a CSV/TSV of (image path, caption) with a header row (SRC: the file)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--images", type=Path, help="the folder the paths are relative to (default: the file's)")
        parser.add_argument("--delimiter", help="column separator (default: tab for .tsv/.tab files, else comma)")
        parser.add_argument("--path-column", help=f"the image path column (default: the first of {PATH_COLUMNS})")
        parser.add_argument("--caption-column", help=f"the caption column (default: the first of {CAPTION_COLUMNS})")
        parser.add_argument("--split", default="train", help="the split the rows are written to (default: train)")
        add_caption_arguments(parser)

    def build(self, src: Path, args: argparse.Namespace) -> Conversion[CaptionJob]:
        delimiter = args.delimiter or ("\t" if src.suffix.lower() in (".tsv", ".tab") else ",")
        jobs = csv_jobs(src, args.images or src.parent, delimiter, args.path_column, args.caption_column)
        return caption_conversion(self.name, {args.split: jobs}, args, {"delimiter": delimiter, "split": args.split})


CONVERTERS = [CocoCaptions(), KarpathyCaptions(), CsvCaptions()]
