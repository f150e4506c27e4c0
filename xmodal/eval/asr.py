"""Character and word error rates of a lip reader, greedy and beam search, and alignment plots (``xmodal eval asr``).

Data: WebDataset shards with ``mp4`` + ``txt`` (and ``flac``/``wav`` for plots), or a GRID/LRS2-style file list,
one utterance per line::

    relative/path/to/clip transcript words ...

The path is relative to the list's root (``--root``; default: the list's folder); ``.mp4`` is appended when it has
no extension. A ``.wav`` or ``.flac`` beside the clip with the same stem is loaded as its audio (needed only for
plots). Blank lines and lines starting with ``#`` are skipped. Transcripts are scored after
:func:`~xmodal.modalities.transcript.normalize_transcript`, so "Bin blue at F 2 now" reads "bin blue at f two now".

Metrics: corpus CER (character edits / reference characters, spaces included) and WER, for greedy decoding and
(``beam_size`` > 1) beam search. :func:`alignment_maps` and :func:`plot_alignments` draw, for the first
utterances, the learned video-frame -> audio-frame attention of the recipe's
:class:`~xmodal.losses.libs.LIBSFrameLoss` as a heat map, with the linear-time diagonal overlaid.
"""

from __future__ import annotations

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


