"""The task metrics of validation: each feeds one :mod:`xmodal.eval.metrics` Metric from the student and the batch.

A recipe lists them under ``model.val_metrics`` (each a :class:`~xmodal.contracts.TaskMetric`); the
:class:`~xmodal.distiller.Distiller` updates them on every validation batch and logs ``val/<name>`` per epoch::

    model:
      val_metrics:
        - class_path: xmodal.eval.tasks.ZeroShotTask
          init_args: {classes: runs/data/shapes/classes.json}

=====================  =========================================================  ===========================
task                   what it reads                                              logged as
=====================  =========================================================  ===========================
:class:`ZeroShotTask`  ``image.emb`` vs the student's prompt-ensembled class text  ``val/zeroshot_top1``, top5
:class:`RetrievalTask` ``image.emb`` and ``text.emb`` of paired images/captions     ``val/i2t_R@1``, ``t2i_R@1``..
:class:`TranscriptTask` ``student.transcribe(batch)`` (greedy) vs ``transcript``    ``val/cer``, ``val/wer``
:class:`DetectionTask` ``student.predict(batch)`` (decoded boxes) vs the batch's    ``val/mAP``, ``val/nds``
                       boxes
:class:`Base2NovelTask` ``image.emb`` vs the student's classifier over all classes   ``val/base``, ``novel``, ``hm``
:class:`ClassifyTask`  the student's logits (``image.logits``) vs ``label``        ``val/accuracy_top1``, ...
=====================  =========================================================  ===========================
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs
from xmodal.eval import metrics
from xmodal.eval.base2novel import classifier_of, read_split
from xmodal.eval.bev import batch_ground_truth
from xmodal.eval.zeroshot import SIMPLE_TEMPLATES, DualEncoder, class_embeddings, cosine_logits


class MissingFieldError(KeyError):
    """A validation batch or the student's outputs lack what a task metric reads."""


def field(source: Mapping[str, Any], key: str, task: str, where: str) -> Any:
    if key not in source:
        raise MissingFieldError(f"{task}: the {where} has no {key!r} (it has {sorted(map(str, source))})")
    return source[key]


class ZeroShotTask(nn.Module):
    """Zero-shot top-k accuracy: the student's image embeddings against its own prompt-ensembled class texts.

    The class embeddings are computed once per validation epoch (at its first batch) with the student's
    ``embed_texts``, as :func:`~xmodal.eval.loops.evaluate_zeroshot` does.

    Args:
        classes: a ``classes.json`` (``classes`` in label order, optional ``templates``), as corpora write it.
        name: prefix of the logged keys (``<name>_top1``).
        ks: the ``k`` values.
        image_key: student output with the image embeddings. label_key: batch field with the class indices.
    """

    def __init__(self, classes: str, name: str = "zeroshot", ks: Sequence[int] = (1, 5), image_key: str = "image.emb",
                 label_key: str = "label") -> None:
        super().__init__()
        spec = json.loads(Path(classes).read_text())
        self.classnames: list[str] = list(spec["classes"])
        self.templates: list[str] = list(spec.get("templates") or SIMPLE_TEMPLATES)
        self.name, self.image_key, self.label_key = name, image_key, label_key
        self.metric = metrics.TopKAccuracy(ks)
        self.classifier: Tensor | None = None

    def update(self, student: nn.Module, outputs: Outputs, batch: Batch) -> None:
        image_emb = field(outputs, self.image_key, self.name, "student's outputs")
        if self.classifier is None:
            encoder = cast(DualEncoder, student)
            self.classifier = class_embeddings(encoder, self.classnames, self.templates).to(image_emb.device)
        self.metric.update(cosine_logits(image_emb, self.classifier), field(batch, self.label_key, self.name, "batch"))

    def compute(self) -> dict[str, Tensor]:
        return {f"{self.name}_{key}": value for key, value in self.metric.compute().items()}

    def reset(self) -> None:
        self.metric.reset()
        self.classifier = None


class ClassifyTask(nn.Module):
    """Top-k accuracy of a classifier student's own logits against the batch's labels.

    Args:
        name: prefix of the logged keys (``<name>_top1``).
        ks: the ``k`` values.
        logits_key: student output with ``N x C`` logits. label_key: batch field with the class indices.
    """

    def __init__(self, name: str = "accuracy", ks: Sequence[int] = (1,), logits_key: str = "image.logits",
                 label_key: str = "label") -> None:
        super().__init__()
        self.name, self.logits_key, self.label_key = name, logits_key, label_key
        self.metric = metrics.TopKAccuracy(ks)

    def update(self, student: nn.Module, outputs: Outputs, batch: Batch) -> None:
        logits = field(outputs, self.logits_key, self.name, "student's outputs")
        self.metric.update(logits, field(batch, self.label_key, self.name, "batch"))

    def compute(self) -> dict[str, Tensor]:
        return {f"{self.name}_{key}": value for key, value in self.metric.compute().items()}

    def reset(self) -> None:
        self.metric.reset()


class RetrievalTask(nn.Module):
    """Image<->text recall@k over the validation set's paired images and captions.

    Args:
        ks: the ``k`` values.
        identical_captions_match: a caption is correct for every image whose own caption is the same string
            (synthetic corpora repeat captions verbatim), as ``xmodal eval retrieval --identical-captions-match``.
        image_key, text_key: student outputs with the embeddings. caption_key: batch field with the captions.
    """

    def __init__(self, ks: Sequence[int] = (1, 5, 10), identical_captions_match: bool = False,
                 image_key: str = "image.emb", text_key: str = "text.emb", caption_key: str = "caption") -> None:
        super().__init__()
        self.identical_captions_match = identical_captions_match
        self.image_key, self.text_key, self.caption_key = image_key, text_key, caption_key
        self.metric = metrics.RetrievalRecall(ks)

    def update(self, student: nn.Module, outputs: Outputs, batch: Batch) -> None:
        image_emb = field(outputs, self.image_key, "retrieval", "student's outputs")
        text_emb = field(outputs, self.text_key, "retrieval", "student's outputs")
        captions = field(batch, self.caption_key, "retrieval", "batch") if self.identical_captions_match else None
        self.metric.update(image_emb, text_emb, captions=captions)

    def compute(self) -> dict[str, Tensor]:
        return self.metric.compute()

    def reset(self) -> None:
        self.metric.reset()


class TranscriptTask(nn.Module):
    """Corpus CER and WER of the student's greedy transcripts (``student.transcribe(batch)``), normalised.

    Args:
        language: of :func:`~xmodal.modalities.transcript.normalize_transcript`.
        transcript_key: batch field with the reference transcripts.
    """

    def __init__(self, language: str = "en", transcript_key: str = "transcript") -> None:
        super().__init__()
        self.transcript_key = transcript_key
        self.cer, self.wer = metrics.TranscriptCER(language), metrics.TranscriptWER(language)

    def update(self, student: nn.Module, outputs: Outputs, batch: Batch) -> None:
        transcribe = getattr(student, "transcribe", None)
        if transcribe is None:
            raise TypeError(f"{type(student).__name__} has no transcribe(batch): CER/WER need its transcripts")
        hypotheses = list(transcribe(batch))
        references = list(field(batch, self.transcript_key, "cer/wer", "batch"))
        self.cer.update(hypotheses, references)
        self.wer.update(hypotheses, references)

    def compute(self) -> dict[str, Tensor]:
        return {"cer": self.cer.compute(), "wer": self.wer.compute()}

    def reset(self) -> None:
        self.cer.reset()
        self.wer.reset()


class DetectionTask(nn.Module):
    """nuScenes-style mAP and NDS of the student's decoded boxes (``student.predict(batch)``) on the batch's boxes.

    Args:
        classes: class names in label order; ``None`` takes the student's (``student.grid.classes``).
        metric_options: keyword arguments of :func:`~xmodal.eval.bev.detection_metrics` (``max_range``, ...).
    """

    def __init__(self, classes: Sequence[str] | None = None, metric_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.classes = list(classes) if classes is not None else None
        self.metric = metrics.DetectionMAP(self.classes or [], metric_options)

    def update(self, student: nn.Module, outputs: Outputs, batch: Batch) -> None:
        predict = getattr(student, "predict", None)
        if predict is None:
            raise TypeError(f"{type(student).__name__} has no predict(batch): mAP/NDS need its decoded boxes")
        if self.classes is None:
            self.metric.classes = list(cast(Any, student).grid.classes)
        self.metric.update(predict(batch), batch_ground_truth(batch))

    def compute(self) -> dict[str, Tensor]:
        values = self.metric.compute()
        return {"mAP": torch.tensor(values["mAP"], dtype=torch.float64),
                "nds": torch.tensor(values["NDS"], dtype=torch.float64)}

    def reset(self) -> None:
        self.metric.reset()


class Base2NovelTask(nn.Module):
    """Base / novel / harmonic-mean top-1 of a prompted student, each half choosing among its own classes.

    The classifier is the student's own over every class of the split (its stored class vectors, else its prompted
    class embeddings, else zero-shot text embeddings: :func:`~xmodal.eval.base2novel.classifier_of`), taken once per
    validation epoch. Validation labels index the split's classes (the full label set, not a few-shot renumbering).

    Args:
        split: the split JSON (``classes``, ``base``, ``novel``).
        image_key: student output with the image embeddings. label_key: batch field with the class indices.
    """

    def __init__(self, split: str, image_key: str = "image.emb", label_key: str = "label") -> None:
        super().__init__()
        self.split = read_split(split)
        self.image_key, self.label_key = image_key, label_key
        self.metric = metrics.Base2NovelAccuracy(self.split)
        self.classifier: Tensor | None = None

    def update(self, student: nn.Module, outputs: Outputs, batch: Batch) -> None:
        image_emb = field(outputs, self.image_key, "base2novel", "student's outputs")
        if self.classifier is None:
            self.classifier = F.normalize(classifier_of(student, self.split).float().to(image_emb.device), dim=-1)
        self.metric.update(cosine_logits(image_emb, self.classifier), field(batch, self.label_key, "base2novel",
                                                                            "batch"))

    def compute(self) -> dict[str, Tensor]:
        values = self.metric.compute()
        return {key: values[key] for key in ("base", "novel", "hm")}

    def reset(self) -> None:
        self.metric.reset()
        self.classifier = None
