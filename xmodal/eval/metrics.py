"""Every recipe's task metric as a torchmetrics ``Metric``: the same objects score ``xmodal eval`` and validation.

Each one accumulates over ``update`` calls (and across DDP ranks in ``compute``) over the protocol's own rules:

* :class:`TopKAccuracy`: zero-shot top-k (:func:`~xmodal.eval.zeroshot.topk_hits`);
* :class:`RetrievalRecall`: image<->text recall@k (:func:`~xmodal.eval.retrieval.recall_at_k`);
* :class:`TranscriptCER` / :class:`TranscriptWER`: torchmetrics' CER/WER on normalised transcripts, the numbers
  of :func:`~xmodal.modalities.transcript.cer` / ``wer`` (:func:`error_rates` for one list of transcripts);
* :class:`DetectionMAP`: nuScenes-style mAP/NDS (:func:`~xmodal.eval.bev.detection_metrics`);
* :class:`Base2NovelAccuracy`: base / novel / harmonic-mean top-1 (:func:`~xmodal.eval.base2novel.subset_hits`).

The evaluation loops (:mod:`xmodal.eval.loops`) and validation (:mod:`xmodal.eval.tasks`) both feed these.

torchmetrics' own top-k accuracy and retrieval metrics break score ties by position; ours count ties against the
model (a collapsed model never scores well), so those two are ``Metric`` subclasses over our rank rules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.text import CharErrorRate, WordErrorRate
from torchmetrics.utilities import dim_zero_cat

from xmodal.eval.base2novel import ClassSplit, harmonic_mean, subset_hits
from xmodal.eval.bev import Detections, detection_metrics
from xmodal.eval.retrieval import retrieval_by_mask, retrieval_metrics
from xmodal.eval.zeroshot import topk_hits
from xmodal.modalities.transcript import normalize_transcript


class TopKAccuracy(Metric):
    """Top-k accuracy of ``N x C`` scores, ties against the model: ``{"top1": ..., "top5": ...}`` (float64).

    ``update(logits, labels)``: ``logits`` ``N x C`` (zero-shot: image embeddings @ class embeddings.T), ``labels``
    ``N`` class indices.
    """

    full_state_update = False
    hits: Tensor
    total: Tensor

    def __init__(self, ks: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        self.add_state("hits", torch.zeros(len(self.ks), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        hits = topk_hits(logits, labels, self.ks)
        self.hits += torch.tensor([hits[k] for k in self.ks], device=self.hits.device)
        self.total += labels.numel()

    def compute(self) -> dict[str, Tensor]:
        n = int(self.total)
        return {f"top{k}": float64(int(h) / n if n else 0.0) for k, h in zip(self.ks, self.hits, strict=True)}


class RetrievalRecall(Metric):
    """Image->text and text->image recall@k over every embedding seen (ties against the model).

    ``update(image_emb, text_emb, text_to_image=None, captions=None)``: ``Ni x D`` images and ``Nt x D`` captions
    of this update; ``text_to_image`` (``Nt``, indices into this update's images) defaults to one caption per image
    in order. With ``captions``, a caption counts as correct for every paired image whose own caption is the same
    string (images and captions must then be paired).

    ``compute()`` gives :func:`~xmodal.eval.retrieval.retrieval_metrics`' keys (``i2t_R@1``, ..., ``t2i_R@10``).
    """

    full_state_update = False
    image_emb: list[Tensor]
    text_emb: list[Tensor]
    text_to_image: list[Tensor]
    sizes: list[Tensor]
    caption_ids: list[Tensor]

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        for name in ("image_emb", "text_emb", "text_to_image", "sizes", "caption_ids"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor | None = None,
               captions: Sequence[str] | None = None) -> None:
        if text_to_image is None:
            text_to_image = torch.arange(image_emb.shape[0], device=image_emb.device)
        if captions is not None:
            if len(captions) != image_emb.shape[0] or text_emb.shape[0] != image_emb.shape[0]:
                raise ValueError("matching identical captions needs one caption per image, paired")
            self.caption_ids.append(torch.tensor([caption_id(c) for c in captions], device=image_emb.device))
        self.image_emb.append(image_emb.detach().float())
        self.text_emb.append(text_emb.detach().float())
        self.text_to_image.append(text_to_image.detach().long())
        self.sizes.append(torch.tensor([[image_emb.shape[0], text_emb.shape[0]]], device=image_emb.device))

    def compute(self) -> dict[str, Tensor]:
        image_emb, text_emb = dim_zero_cat(self.image_emb), dim_zero_cat(self.text_emb)
        if len(self.caption_ids) > 0:  # a list, or one tensor once synced across ranks
            ids = dim_zero_cat(self.caption_ids)
            if ids.shape[0] != text_emb.shape[0]:
                raise ValueError("captions were given to some updates and not to others")
            metrics = retrieval_by_mask(image_emb, text_emb, ids[:, None] == ids[None, :], self.ks)
        else:
            metrics = retrieval_metrics(image_emb, text_emb, self._global_text_to_image(), self.ks)
        return {k: float64(v) for k, v in metrics.items()}

    def _global_text_to_image(self) -> Tensor:
        """Each update's caption->image indices shifted by the images of the updates before it (on every rank)."""
        sizes = dim_zero_cat(self.sizes).view(-1, 2)
        offsets = torch.cumsum(sizes[:, 0], 0) - sizes[:, 0]
        return dim_zero_cat(self.text_to_image) + torch.repeat_interleave(offsets, sizes[:, 1])


def caption_id(caption: str) -> int:
    """A 63-bit id of a caption's string: equal strings, equal ids (a tensor state, unlike the string)."""
    return int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "little") >> 1


class NormalizedErrorRate(Metric):
    """torchmetrics' CER/WER on :func:`~xmodal.modalities.transcript.normalize_transcript`-ed texts, and 0 (not
    NaN) when the references have no unit; mixed in before ``CharErrorRate``/``WordErrorRate``."""

    errors: Tensor
    total: Tensor

    def __init__(self, language: str = "en", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.language = language

    def update(self, preds: str | list[str], target: str | list[str]) -> None:
        # super() is CharErrorRate or WordErrorRate, next in the subclass's MRO
        super().update(*normalized(preds, target, self.language))  # type: ignore[safe-super]

    def compute(self) -> Tensor:
        """``errors / max(total, 1)`` in float64 (the float32 states hold whole counts exactly)."""
        return self.errors.double() / self.total.double().clamp(min=1)


class TranscriptCER(NormalizedErrorRate, CharErrorRate):
    """Corpus character error rate: character edits / reference characters (spaces included), as
    :func:`~xmodal.modalities.transcript.cer`; ``update(hypotheses, references)`` (torchmetrics' order)."""


class TranscriptWER(NormalizedErrorRate, WordErrorRate):
    """Corpus word error rate (whitespace-separated words), as :func:`~xmodal.modalities.transcript.wer`;
    ``update(hypotheses, references)``."""


def error_rates(references: Sequence[str], hypotheses: Sequence[str], language: str = "en") -> dict[str, float]:
    """Corpus ``{"cer", "wer"}`` of normalised transcripts (:class:`TranscriptCER`, :class:`TranscriptWER`)."""
    char, word = TranscriptCER(language), TranscriptWER(language)
    char.update(list(hypotheses), list(references))
    word.update(list(hypotheses), list(references))
    return {"cer": char.compute().item(), "wer": word.compute().item()}


def normalized(preds: str | list[str], target: str | list[str], language: str) -> tuple[list[str], list[str]]:
    """Hypotheses and references as lists of normalised transcripts."""
    hypotheses, references = as_texts(preds), as_texts(target)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    return [normalize_transcript(t, language) for t in hypotheses], [normalize_transcript(t, language)
                                                                      for t in references]


def as_texts(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


class DetectionMAP(Metric):
    """nuScenes-style detection metrics (mAP, NDS, TP errors) of every sample seen.

    ``update(preds, target)``: per sample, predictions ``{"boxes": K x 7, "scores": K, "labels": K}`` and ground
    truth ``{"boxes": M x 7, "labels": M, ["num_points": M]}``. ``compute()`` is
    :func:`~xmodal.eval.bev.detection_metrics`' dict (``"mAP"``, ``"NDS"``, ...) over them.

    Args:
        classes: class names in label order.
        metric_options: keyword arguments of :func:`~xmodal.eval.bev.detection_metrics` (``max_range``, ...).
    """

    full_state_update = False
    pred_rows: list[Tensor]
    gt_rows: list[Tensor]
    counts: list[Tensor]

    def __init__(self, classes: Sequence[str], metric_options: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classes = list(classes)
        self.metric_options = dict(metric_options or {})
        # Per sample: its prediction rows (box, score, label), ground-truth rows (box, label, points) and their
        # counts; flat float64 rows because torchmetrics concatenates list states across ranks.
        self.add_state("pred_rows", [], dist_reduce_fx="cat")
        self.add_state("gt_rows", [], dist_reduce_fx="cat")
        self.add_state("counts", [], dist_reduce_fx="cat")

    def update(self, preds: Sequence[Detections], target: Sequence[Detections]) -> None:
        if len(preds) != len(target):
            raise ValueError(f"{len(preds)} prediction samples but {len(target)} ground-truth samples")
        for pred, gt in zip(preds, target, strict=True):
            boxes = as_rows(pred["boxes"], 7)
            scores = as_rows(pred["scores"], 1) if "scores" in pred else torch.ones(len(boxes), 1, dtype=torch.float64)
            gt_boxes = as_rows(gt["boxes"], 7)
            points = as_rows(gt["num_points"], 1) if "num_points" in gt else torch.zeros(len(gt_boxes), 1,
                                                                                          dtype=torch.float64)
            self.pred_rows.append(torch.cat([boxes, scores, as_rows(pred["labels"], 1)], 1).to(self.device))
            self.gt_rows.append(torch.cat([gt_boxes, as_rows(gt["labels"], 1), points], 1).to(self.device))
            self.counts.append(torch.tensor([[len(boxes), len(gt_boxes), int("num_points" in gt)]], device=self.device))

    def compute(self) -> dict[str, Any]:
        preds, truths = self.samples()
        return detection_metrics(preds, truths, self.classes, **self.metric_options)

    def samples(self) -> tuple[list[Detections], list[Detections]]:
        """The accumulated predictions and ground truth, one dict per sample (CPU)."""
        if len(self.counts) == 0:  # a list, or one tensor once synced across ranks
            return [], []
        counts = dim_zero_cat(self.counts).view(-1, 3).cpu()
        pred_rows = dim_zero_cat(self.pred_rows).view(-1, 9).cpu().split(counts[:, 0].tolist())
        gt_rows = dim_zero_cat(self.gt_rows).view(-1, 9).cpu().split(counts[:, 1].tolist())
        preds: list[Detections] = [{"boxes": p[:, :7], "scores": p[:, 7], "labels": p[:, 8].long()} for p in pred_rows]
        truths: list[Detections] = []
        for g, has_points in zip(gt_rows, counts[:, 2].tolist(), strict=True):
            gt = {"boxes": g[:, :7], "labels": g[:, 7].long()}
            truths.append({**gt, "num_points": g[:, 8].long()} if has_points else gt)
        return preds, truths


def as_rows(value: Any, width: int) -> Tensor:
    """``K x width`` float64 (on the CPU) from a tensor or array of ``K`` rows (or ``K`` values for width 1)."""
    tensor = torch.as_tensor(value.detach() if isinstance(value, Tensor) else value).cpu().double()
    if tensor.numel() == 0:
        return torch.zeros(0, width, dtype=torch.float64)
    return tensor.reshape(-1, width) if width == 1 else tensor.reshape(len(tensor), -1)[:, :width]


class Base2NovelAccuracy(Metric):
    """Base / novel / harmonic-mean top-1 accuracy (base-to-novel protocol), float64.

    ``update(logits, labels)``: ``N x C`` scores over every class of ``split`` and ``N`` class indices. Base
    accuracy chooses among base classes on base-class samples, novel likewise (ties against the model).
    ``compute()`` gives ``{"base", "novel", "hm", "n_base", "n_novel"}``.
    """

    full_state_update = False
    hits: Tensor
    counts: Tensor

    def __init__(self, split: ClassSplit, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.split = split
        self.add_state("hits", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")  # base, novel
        self.add_state("counts", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        base_hits, n_base = subset_hits(logits, labels, self.split.base)
        novel_hits, n_novel = subset_hits(logits, labels, self.split.novel)
        self.hits += torch.tensor([base_hits, novel_hits], device=self.hits.device)
        self.counts += torch.tensor([n_base, n_novel], device=self.counts.device)

    def compute(self) -> dict[str, Tensor]:
        (base_hits, novel_hits), (n_base, n_novel) = self.hits.tolist(), self.counts.tolist()
        base = base_hits / n_base if n_base else 0.0
        novel = novel_hits / n_novel if n_novel else 0.0
        return {"base": float64(base), "novel": float64(novel), "hm": float64(harmonic_mean(base, novel)),
                "n_base": torch.tensor(n_base), "n_novel": torch.tensor(n_novel)}


def float64(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)
