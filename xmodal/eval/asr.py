"""``xmodal eval asr``: character and word error rates of a lip reader, greedy and beam search, and alignment plots.

Usage::

    xmodal eval asr --model runs/lipreading/student          --shards 'data/test-*.tar'
    xmodal eval asr --config configs/lipreading/libs.yaml --checkpoint last.ckpt --list test.txt --plot out/
    xmodal eval asr ... --beam-size 4 --num-frames 75 --size 64 --fps 25 --out results.json

Model: ``--model`` is a zoo name or folder holding a :class:`~xmodal.students.lipreader.LipReader` (what
:class:`~xmodal.callbacks.ExportStudent` writes); ``--config`` (+ ``--checkpoint``, a Lightning checkpoint of that
recipe) rebuilds the whole :class:`~xmodal.distiller.Distiller`, teacher and losses included, which ``--plot`` needs.

Data: ``--shards`` (WebDataset shards with ``mp4`` + ``txt``, and ``flac``/``wav`` for plots), or ``--list``, a
GRID/LRS2-style file list, one utterance per line::

    relative/path/to/clip transcript words ...

The path is relative to ``--root`` (default: the list's folder); ``.mp4`` is appended when it has no extension.
A ``.wav`` or ``.flac`` beside the clip with the same stem is loaded as its audio (needed only for plots). Blank
lines and lines starting with ``#`` are skipped. Transcripts are scored after
:func:`~xmodal.modalities.transcript.normalize_transcript`, so "Bin blue at F 2 now" reads "bin blue at f two now".

Metrics: corpus CER (character edits / reference characters, spaces included) and WER, for greedy decoding and
(``--beam-size`` > 1) beam search. ``--plot DIR`` writes ``DIR/alignment.png``: for the first ``--plot-count``
utterances, the learned video-frame -> audio-frame attention of the recipe's
:class:`~xmodal.losses.libs.LIBSFrameLoss` as a heat map, with the linear-time diagonal overlaid.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xmodal.contracts import CACHE_PREFIX, Batch
from xmodal.modalities.transcript import cer, normalize_transcript, wer

AUDIO_SIBLINGS = (".wav", ".flac")


def read_file_list(path: str | Path, root: str | Path | None = None) -> list[tuple[Path, str]]:
    """``(video path, transcript)`` pairs of a list file (format in the module docstring)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) < 2:
            raise ValueError(f"{path}:{number}: expected 'relative/video/path transcript...', got {line!r}")
        video = base / parts[0]
        items.append((video if video.suffix else video.with_suffix(".mp4"), normalize_transcript(parts[1])))
    if not items:
        raise ValueError(f"{path}: no utterances")
    return items


def list_batches(items: Sequence[tuple[Path, str]], modalities: Sequence[Any], batch_size: int) -> Iterator[Batch]:
    """Decoded, collated batches of a file list with the given modality plug-ins (video, audio, transcript)."""
    from xmodal.data.decoders import collate_items, decode_sample

    for start in range(0, len(items), batch_size):
        decoded = []
        for video, text in items[start : start + batch_size]:
            if not video.is_file():
                raise FileNotFoundError(f"video not found: {video}")
            sample: dict[str, Any] = {"__key__": str(video), "mp4": video.read_bytes(), "txt": text.encode()}
            for ext in AUDIO_SIBLINGS:
                if video.with_suffix(ext).is_file():
                    sample[ext[1:]] = video.with_suffix(ext).read_bytes()
            usable = [m for m in modalities if m.name != "audio" or any(e[1:] in sample for e in AUDIO_SIBLINGS)]
            decoded.append(decode_sample(sample, usable))
        usable = [m for m in modalities if m.name != "audio" or all("audio" in item for item in decoded)]
        yield collate_items(decoded, usable)


def to_device(batch: Batch, device: torch.device, modalities: Sequence[Any]) -> Batch:
    """Move tensors to ``device`` and run the modalities' evaluation-time device transforms."""
    from xmodal.data.wds import move_batch

    batch = move_batch(batch, device)
    for modality in modalities:
        if all(field in batch for field in modality.fields):
            batch = modality.on_device(batch, train=False)
    return batch


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus ``{"cer", "wer"}`` of normalised transcripts."""
    return {"cer": cer(references, hypotheses), "wer": wer(references, hypotheses)}


def transcribe_all(
    model: nn.Module, batches: Iterable[Batch], modalities: Sequence[Any], device: torch.device, beam_size: int
) -> dict[str, list[str]]:
    """References and greedy (and beam, with ``beam_size > 1``) hypotheses over every batch."""
    out: dict[str, list[str]] = {"references": [], "greedy": [], "beam": []}
    for batch in batches:
        batch = to_device(batch, device, modalities)
        out["references"] += list(batch["transcript"])
        out["greedy"] += model.transcribe(batch, beam_size=1)  # type: ignore[operator]
        if beam_size > 1:
            out["beam"] += model.transcribe(batch, beam_size=beam_size)  # type: ignore[operator]
    return out


def evaluate_asr(
    model: nn.Module, batches: Iterable[Batch], modalities: Sequence[Any], device: str | torch.device = "cpu",
    beam_size: int = 4, examples: int = 5,
) -> dict[str, Any]:
    """CER/WER of a lip reader (``model.transcribe(batch, beam_size)``) over ``batches``.

    Returns:
        ``{"utterances", "greedy_cer", "greedy_wer", ["beam_cer", "beam_wer"], "examples": [...]}``.
    """
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    try:
        texts = transcribe_all(model, batches, modalities, device, beam_size)
    finally:
        model.train(was_training)
    refs = texts["references"]
    metrics: dict[str, Any] = {"utterances": len(refs)}
    for decoder in ("greedy", "beam"):
        if texts[decoder]:
            metrics.update({f"{decoder}_{k}": v for k, v in error_rates(refs, texts[decoder]).items()})
    pairs = zip(refs[:examples], texts["greedy"], strict=False)
    metrics["examples"] = [{"reference": ref, "greedy": hyp} for ref, hyp in pairs]
    return metrics


def alignment_maps(distiller: nn.Module, batch: Batch, count: int) -> list[Tensor]:
    """The recipe's learned video->audio attention for the first ``count`` clips: ``Tv_i x Ta_i`` each (CPU)."""
    from xmodal.losses.libs import LIBSFrameLoss

    frame_losses = [loss for loss in getattr(distiller, "terms", []) if isinstance(loss, LIBSFrameLoss)]
    teacher = getattr(distiller, "teacher", None)
    if not frame_losses or teacher is None:
        raise ValueError("alignment plots need a recipe with a LIBSFrameLoss and a teacher (--config)")
    loss = frame_losses[0]
    if getattr(teacher, "cache_manifest", None) is not None and not any(k.startswith(CACHE_PREFIX) for k in batch):
        raise ValueError("the recipe's teacher is a CachedTeacher and these shards carry no cached outputs: plot "
                         "with the live teacher (the CachedTeacher's `teacher:` as the recipe's teacher)")
    with torch.no_grad():
        s_out, t_out = distiller.student(batch), teacher(batch)  # type: ignore[operator]
        (s, s_mask), t_all = loss.select(s_out, t_out)
        t, t_mask = t_all[0], t_all[1]
        weights = loss.attention(s, s_mask, t, t_mask).cpu()
    tv, ta = s_mask.sum(1).tolist(), t_mask.sum(1).tolist()
    return [weights[i, : int(tv[i]), : int(ta[i])] for i in range(min(count, weights.shape[0]))]


def plot_alignments(maps: Sequence[Tensor], titles: Sequence[str], path: str | Path) -> Path:
    """Heat maps (video frames down, audio frames across) with the linear-time diagonal overlaid, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 3.6), squeeze=False)
    for ax, weights, title in zip(axes[0], maps, titles, strict=True):
        tv, ta = weights.shape
        ax.imshow(weights.numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        rows = torch.arange(tv).float()
        ax.plot((rows + 0.5) * ta / tv - 0.5, rows.numpy(), "w--", linewidth=1, label="linear time")
        ax.set_xlabel(f"audio frame ({ta})")
        ax.set_ylabel(f"video frame ({tv})")
        ax.set_title(title[:40], fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_distiller(config: str | Path, checkpoint: str | Path | None = None) -> nn.Module:
    """The :class:`~xmodal.distiller.Distiller` of a recipe's ``model:`` section, with a checkpoint's weights."""
    import yaml
    from jsonargparse import ArgumentParser

    import xmodal.losses  # noqa: F401  (short class names of losses and students)
    import xmodal.students.lipreader  # noqa: F401
    from xmodal.distiller import Distiller

    try:
        import xmodal.cli  # noqa: F401  (every other short name the recipe may use)
    except ImportError:  # a plug-in that fails to import must not stop an evaluation that does not use it
        pass

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Distiller, "model", fail_untyped=False)
    parsed = parser.parse_object({"model": yaml.safe_load(Path(config).read_text())["model"]})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    distiller = instantiate(parsed).model
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        distiller.load_state_dict(state.get("state_dict", state))
    return distiller


def add_asr_parser(tasks: Any) -> argparse.ArgumentParser:
    """Add the ``asr`` subcommand to ``xmodal eval``'s subparsers."""
    asr = tasks.add_parser("asr", help="lip-reading CER/WER (greedy and beam) and alignment plots")
    model = asr.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="NAME_OR_DIR", help="zoo name or folder of a LipReader")
    model.add_argument("--config", metavar="YAML", help="training recipe (rebuilds student, teacher and losses)")
    asr.add_argument("--checkpoint", metavar="CKPT", help="Lightning checkpoint of --config's run")
    source = asr.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", metavar="PATTERN", help="WebDataset shards with mp4 + txt (+ flac for --plot)")
    source.add_argument("--list", metavar="FILE", help="file list: 'relative/video/path transcript...' per line")
    asr.add_argument("--root", metavar="DIR", help="folder --list paths are relative to (default: the list's)")
    asr.add_argument("--beam-size", type=int, default=4, metavar="K", help="beam width; 1 = greedy only")
    asr.add_argument("--num-frames", type=int, default=75, metavar="N", help="most frames per clip (75 = 3 s)")
    asr.add_argument("--size", type=int, default=64, metavar="PX", help="frame side (64 = the recipe's)")
    asr.add_argument("--fps", type=float, default=25.0, help="frame rate clips are re-timed to")
    asr.add_argument("--plot", metavar="DIR", help="write DIR/alignment.png (needs --config and audio)")
    asr.add_argument("--plot-count", type=int, default=4, metavar="N", help="utterances in the plot")
    asr.add_argument("--batch-size", type=int, default=16, metavar="N")
    asr.add_argument("--device", help="cpu, cuda... (default: cuda when available)")
    asr.add_argument("--out", metavar="FILE", help="write the results JSON here")
    asr.set_defaults(subparser=asr)
    return asr


def asr_modalities(args: argparse.Namespace, with_audio: bool) -> list[Any]:
    from xmodal.modalities.audio import AudioModality
    from xmodal.modalities.transcript import TranscriptModality
    from xmodal.modalities.video import VideoModality

    modalities: list[Any] = [VideoModality(args.num_frames, args.size, fps=args.fps), TranscriptModality()]
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
    from xmodal.data.wds import CountedBatches

    model, distiller = load_asr_model(parser, args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modalities = asr_modalities(args, with_audio=False)
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
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


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
