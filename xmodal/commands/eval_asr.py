"""``xmodal eval asr``: character and word error rates of a lip reader, greedy and beam search, and alignment plots.

Usage::

    xmodal eval asr --model runs/lipreading/student          --shards 'data/test-*.tar'
    xmodal eval asr --config configs/lipreading/libs.yaml --checkpoint last.ckpt --list test.txt --plot out/
    xmodal eval asr ... --beam-size 4 --num-frames 75 --size 64 --fps 25 --out results.json

Model: ``--model`` is a zoo name or folder holding a :class:`~xmodal.students.lipreader.LipReader` (what
:class:`~xmodal.callbacks.ExportStudent` writes); ``--config`` (+ ``--checkpoint``, a Lightning checkpoint of that
recipe) rebuilds the whole :class:`~xmodal.distiller.Distiller`, teacher and losses included, which ``--plot`` needs.

Data: ``--shards`` (WebDataset shards with ``mp4`` + ``txt``, and ``flac``/``wav`` for plots), or ``--list``, a
GRID/LRS2-style file list (format in :mod:`xmodal.data.eval_sets`). ``--plot DIR`` writes ``DIR/alignment.png``: for the
first ``--plot-count`` utterances, the learned video-frame -> audio-frame attention of the recipe's
:class:`~xmodal.losses.libs.LIBSFrameLoss` as a heat map, with the linear-time diagonal overlaid.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.commands.eval_common import emit_results
from xmodal.contracts import Batch
from xmodal.data.eval_sets import list_batches, read_file_list, to_device
from xmodal.eval.loops import evaluate_asr, transcript_language
from xmodal.render import alignment_maps, plot_alignments
from xmodal.zoo.loading import load_distiller


def asr_modalities(args: argparse.Namespace, with_audio: bool, language: str = "en") -> list[Any]:
    from xmodal.modalities.audio import AudioModality
    from xmodal.modalities.transcript import TranscriptModality
    from xmodal.modalities.video import VideoModality

    modalities: list[Any] = [VideoModality(args.num_frames, args.size, fps=args.fps),
                             TranscriptModality(language=language)]
    return modalities + [AudioModality(16000, max_seconds=None)] if with_audio else modalities


def asr_batches(args: argparse.Namespace, modalities: Sequence[Any]) -> Iterable[Batch]:
    """A fresh pass over ``--shards`` or ``--list``."""
    if args.list:
        return list_batches(read_file_list(args.list, args.root), modalities, args.batch_size)
    from xmodal.data.wds import CountedBatches, make_pipeline

    return CountedBatches(make_pipeline(args.shards, modalities, args.batch_size, train=False), args.shards)


def load_asr_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[nn.Module, nn.Module | None]:
    """The lip reader and, with ``--config``, the whole Distiller (for plots); bad paths exit with status 2."""
    try:
        if args.config:
            distiller = load_distiller(args.config, args.checkpoint)
            return distiller.student, distiller  # type: ignore[return-value]
        from xmodal.zoo import create_model

        model = create_model(args.model)
    except (FileNotFoundError, ValueError, ImportError, KeyError) as error:
        parser.error(f"{error}")
    if not hasattr(model, "transcribe"):
        parser.error(f"--model {args.model}: {type(model).__name__} has no transcribe(batch, beam_size)")
    return model, None


def run_asr(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """``xmodal eval asr``: evaluate, optionally plot, print a table and the JSON (and write ``--out``)."""
    if args.checkpoint and not args.config:
        parser.error("--checkpoint needs --config (the recipe it was trained with)")
    if args.plot and not args.config:
        parser.error("--plot needs --config (the alignment module and the teacher live in the recipe)")
    if args.beam_size < 1 or args.batch_size < 1:
        parser.error("--beam-size and --batch-size must be >= 1")
    if args.plot:
        require_matplotlib("--plot")
    from xmodal.data.wds import CountedBatches

    model, distiller = load_asr_model(parser, args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modalities = asr_modalities(args, with_audio=False, language=transcript_language(model))
    try:
        batches = asr_batches(args, modalities)
        metrics = evaluate_asr(model, batches, modalities, device, args.beam_size)
        if args.plot:
            metrics["alignment_png"] = str(write_alignment_plot(distiller, args, device))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"xmodal eval asr: {error}") from error
    results = {"task": "asr", "model": args.model or args.config, "dataset": args.shards or args.list,
               "beam_size": args.beam_size, "metrics": metrics}
    if isinstance(batches, CountedBatches):
        results["skipped"] = batches.tally.as_dict()
        print(f"data: {batches.tally.summary()}")
    print(format_asr_table(results))
    emit_results(results, args.out)
    return results


def require_matplotlib(option: str) -> None:
    """Exit with one line naming the extra when matplotlib, which only ``option`` needs, is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"xmodal eval asr: {option} draws with matplotlib, which is not installed; it comes with the "
                         "'plots' extra: pip install 'xmodal[plots]'") from None


def write_alignment_plot(distiller: nn.Module | None, args: argparse.Namespace, device: torch.device) -> Path:
    """Plot the first ``--plot-count`` utterances' alignment into ``--plot``/alignment.png."""
    assert distiller is not None
    modalities = asr_modalities(args, with_audio=True)
    batch = next(iter(asr_batches(args, modalities)))
    if "audio" not in batch:
        raise ValueError("alignment plots need audio (flac in the shards, or a .wav/.flac beside each listed clip)")
    distiller.to(device).eval()
    teacher = getattr(distiller, "teacher", None)
    if isinstance(teacher, nn.Module):
        teacher.to(device)
    batch = to_device(batch, device, modalities)
    maps = alignment_maps(distiller, batch, args.plot_count)
    return plot_alignments(maps, batch["transcript"][: len(maps)], Path(args.plot) / "alignment.png")


def format_asr_table(results: dict[str, Any]) -> str:
    lines = [f"asr  model={results['model']}  data={results['dataset']}  beam={results['beam_size']}"]
    for key, value in results["metrics"].items():
        if isinstance(value, (int, float)):
            lines.append(f"  {key:<12}  {value:>8.4f}" if isinstance(value, float) else f"  {key:<12}  {value:>8}")
    return "\n".join(lines)
