"""The evaluation loops of ``xmodal eval``, the probes and the benchmarks: a model over a loader into the
:mod:`xmodal.eval.metrics` Metrics (updated per batch, computed at the end), the same objects validation uses.

===========================  ==================================  =========================================
loop                         model                               metric (:mod:`xmodal.eval.metrics`)
===========================  ==================================  =========================================
:func:`evaluate_zeroshot`    ``embed_images``, ``embed_texts``   :class:`~xmodal.eval.metrics.TopKAccuracy`
:func:`evaluate_retrieval`   ``embed_images``, ``embed_texts``   :class:`~xmodal.eval.metrics.RetrievalRecall`
:func:`evaluate_base2novel`  ``embed_images`` and a classifier   :class:`~xmodal.eval.metrics.Base2NovelAccuracy`
:func:`evaluate_asr`         ``transcribe(batch, beam_size)``    ``TranscriptCER``, ``TranscriptWER``
:func:`evaluate_bev`         ``predict(batch)`` (decoded boxes)  :class:`~xmodal.eval.metrics.DetectionMAP`
===========================  ==================================  =========================================

Each returns plain numbers (``float``/``int``), with the count of what it scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from xmodal.contracts import Batch, Modality
from xmodal.data.eval_sets import ImageFiles, image_loader, load_captions, scan_image_folder, to_device
from xmodal.eval import metrics
from xmodal.eval.base2novel import ClassSplit, classifier_of
from xmodal.eval.bev import Detections, Detector, batch_ground_truth, write_results
from xmodal.eval.zeroshot import (
    SIMPLE_TEMPLATES,
    DualEncoder,
    Template,
    class_embeddings,
    cosine_logits,
    encode_texts,
    evaluating,
)

# Called with each batch, its predictions, ground truth and sample tokens (e.g. xmodal.render.BEVRenders).
BatchHook = Callable[[Batch, Sequence[Detections], Sequence[Detections], Sequence[str]], None]


def plain(values: Mapping[str, Tensor]) -> dict[str, Any]:
    """A Metric's computed tensors as Python numbers (float64 -> float, integer -> int)."""
    return {key: value.item() for key, value in values.items()}


# ------------------------------------------------------------------------------------------ zero-shot, retrieval


@torch.inference_mode()
def evaluate_zeroshot(
    model: DualEncoder,
    loader: Iterable[Mapping[str, Any]],
    classnames: Sequence[str],
    templates: Sequence[Template] = SIMPLE_TEMPLATES,
    device: str | torch.device | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Zero-shot top-k accuracy of ``model`` on a labelled image loader.

    Args:
        model: has ``embed_images`` and ``embed_texts``; put in eval mode for the run, then restored.
        loader: yields dicts with ``image`` (uint8 or float ``B x 3 x H x W``) and ``label`` (``B`` class indices).
        classnames: the ``C`` class names, in label order.
        templates: prompt templates, ensembled per class.
        device: where to run (the model is moved there); ``None`` keeps the model where it is.
        ks: the ``k`` values.

    Returns:
        ``{"top1": ..., "top5": ..., "n": N}``, accuracies as fractions in [0, 1].
    """
    metric = metrics.TopKAccuracy(ks)
    with evaluating(model, device) as dev:
        classifier = class_embeddings(model, classnames, templates).to(dev)
        for batch in tqdm(loader, desc="zero-shot", disable=None):
            image_emb = model.embed_images(batch["image"].to(dev, non_blocking=True))
            metric.update(cosine_logits(image_emb, classifier), batch["label"].to(dev, non_blocking=True))
    return {**plain(metric.compute()), "n": int(metric.total)}


def evaluate_zeroshot_folder(
    model: DualEncoder,
    root: str | Path,
    templates: Sequence[Template] = SIMPLE_TEMPLATES,
    image_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    classnames: Sequence[str] | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 accuracy on an ImageNet-style folder (see :mod:`xmodal.data.eval_sets`).

    Args:
        model: has ``embed_images`` and ``embed_texts``.
        root: the folder of class folders.
        templates: prompt templates with a ``{}`` placeholder.
        image_size: side images are decoded to (the model resizes again to its own input size).
        batch_size: images per batch.
        device: where to run; ``None`` keeps the model where it is.
        classnames: names for the sorted class folders, overriding the folder names.
        num_workers: data-loader worker processes.

    Returns:
        ``{"top1", "top5", "n", "classes"}``.
    """
    paths, labels, folder_names = scan_image_folder(root)
    names = list(classnames) if classnames is not None else folder_names
    if len(names) != len(folder_names):
        raise ValueError(f"{root} has {len(folder_names)} class folders but {len(names)} class names were given")
    loader = image_loader(ImageFiles(paths, image_size, labels), batch_size, num_workers)
    return {**evaluate_zeroshot(model, loader, names, templates, device), "classes": len(names)}


@torch.inference_mode()
def evaluate_retrieval(
    model: DualEncoder,
    loader: Iterable[Mapping[str, Any]],
    device: str | torch.device | None = None,
    ks: Sequence[int] = (1, 5, 10),
    identical_captions_match: bool = False,
) -> dict[str, Any]:
    """Retrieval recall@k on a loader of image-caption pairs, one caption per image (the shards case).

    Conventions (those of the COCO/Flickr30k benchmarks, :func:`~xmodal.eval.retrieval.recall_at_k`): ties are
    broken against the model; image->text is a hit when any of the image's captions is.

    Args:
        model: has ``embed_images`` and ``embed_texts``; put in eval mode for the run, then restored.
        loader: yields dicts with ``image`` (uint8 or float ``B x 3 x H x W``) and ``caption`` (``B`` strings).
        device: where to run (the model is moved there); ``None`` keeps the model where it is.
        ks: the ``k`` values.
        identical_captions_match: count a caption as correct for every image whose own caption is the same
            string (and vice versa). Synthetic corpora repeat captions verbatim; without this, a model cannot
            tell which of several identically described images a caption "belongs" to, and ties count against it.

    Returns:
        :class:`~xmodal.eval.metrics.RetrievalRecall`'s keys (``i2t_R@1``, ...) plus ``n_images`` and ``n_texts``.
    """
    metric = metrics.RetrievalRecall(ks)
    n = 0
    with evaluating(model, device) as dev:
        for batch in tqdm(loader, desc="retrieval", disable=None):
            image_emb = model.embed_images(batch["image"].to(dev, non_blocking=True)).float()
            text_emb = model.embed_texts(list(batch["caption"])).float().to(dev)
            metric.update(image_emb, text_emb, captions=list(batch["caption"]) if identical_captions_match else None)
            n += image_emb.shape[0]
    return {**plain(metric.compute()), "n_images": n, "n_texts": n}


@torch.inference_mode()
def evaluate_retrieval_json(
    model: DualEncoder,
    captions_json: str | Path,
    image_root: str | Path,
    image_size: int,
    batch_size: int = 64,
    split: str | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, Any]:
    """Retrieval recall@k on a COCO/Flickr caption file, with all of each image's captions.

    Args:
        model: has ``embed_images`` and ``embed_texts``; put in eval mode for the run, then restored.
        captions_json: a Karpathy-split or COCO-annotations JSON (:func:`~xmodal.data.eval_sets.load_captions`).
        image_root: the folder that image paths in the JSON are relative to.
        image_size: side images are decoded to (the model resizes again to its own input size).
        batch_size: images (and captions) per batch.
        split: keep only this split (Karpathy files); ``None`` keeps every image.
        device: where to run; ``None`` keeps the model where it is.
        num_workers: data-loader worker processes.
        ks: the ``k`` values.

    Returns:
        :class:`~xmodal.eval.metrics.RetrievalRecall`'s keys plus ``n_images`` and ``n_texts``.
    """
    pairs = load_captions(captions_json, split)
    if not pairs:
        raise ValueError(f"{captions_json}: no captioned images" + (f" in split {split!r}" if split else ""))
    captions = [cap for _, caps in pairs for cap in caps]
    text_to_image = torch.tensor([i for i, (_, caps) in enumerate(pairs) for _ in caps])
    loader = image_loader(ImageFiles([Path(image_root) / p for p, _ in pairs], image_size), batch_size, num_workers)
    metric = metrics.RetrievalRecall(ks)
    with evaluating(model, device) as dev:
        batches = tqdm(loader, desc="retrieval images", disable=None)
        image_emb = torch.cat([model.embed_images(b["image"].to(dev, non_blocking=True)).float() for b in batches])
        text_emb = encode_texts(model, captions, batch_size).to(dev)
        # one update: an image's captions may be encoded in another batch than the image
        metric.update(image_emb, text_emb, text_to_image.to(dev))
    return {**plain(metric.compute()), "n_images": len(pairs), "n_texts": len(captions)}


# ------------------------------------------------------------------------------------------------ base-to-novel


@torch.inference_mode()
def evaluate_base2novel(
    model: Any, loader: Iterable[Mapping[str, Any]], split: ClassSplit, classifier: Tensor | None = None,
    templates: Sequence[Template] = SIMPLE_TEMPLATES, device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Base / novel / HM top-1 accuracy of ``model`` on a labelled image loader (:mod:`xmodal.eval.base2novel`).

    Args:
        model: has ``embed_images(images) -> B x D``; the classifier comes from
            :func:`~xmodal.eval.base2novel.classifier_of` unless given.
        loader: yields ``image`` (``B x 3 x H x W``) and ``label`` (``B``, indices into ``split.classes``).
        split: the class split.
        classifier: ``C x D`` class embeddings to use instead (e.g. a stored class vectors file).
        templates: prompt templates for the zero-shot classifier.
        device: where to run; ``None`` keeps the model where it is.

    Returns:
        ``{"base", "novel", "hm"}`` accuracies in [0, 1] and the counts ``n_base``/``n_novel``.
    """
    metric = metrics.Base2NovelAccuracy(split)
    with evaluating(model, device) as dev:
        weights = classifier if classifier is not None else classifier_of(model, split, templates)
        weights = F.normalize(weights.float().to(dev), dim=-1)
        for batch in loader:
            image_emb = model.embed_images(batch["image"].to(dev, non_blocking=True))
            metric.update(cosine_logits(image_emb, weights), batch["label"].to(dev))
    if metric.update_count == 0:
        raise ValueError("the evaluation loader yielded no batch")
    return plain(metric.compute())


# ----------------------------------------------------------------------------------------------------- lip reading


def transcript_language(model: nn.Module) -> str:
    """The language a lip reader's transcripts are normalised in: its vocabulary's (``model.vocab.language``), else
    English."""
    return str(getattr(getattr(model, "vocab", None), "language", None) or "en")


def evaluate_asr(
    model: nn.Module, batches: Iterable[Batch], modalities: Sequence[Any], device: str | torch.device = "cpu",
    beam_size: int = 4, examples: int = 5, language: str | None = None,
) -> dict[str, Any]:
    """Corpus CER/WER of a lip reader (``model.transcribe(batch, beam_size)``) over ``batches``, greedy and (with
    ``beam_size > 1``) beam search, on :func:`~xmodal.modalities.transcript.normalize_transcript`-ed texts, in
    ``language`` (default: the model's vocabulary's, else English).

    Returns:
        ``{"utterances", "greedy_cer", "greedy_wer", ["beam_cer", "beam_wer"], "examples": [...]}`` (no rates
        when there was no utterance).
    """
    device = torch.device(device)
    widths = {"greedy": 1, **({"beam": beam_size} if beam_size > 1 else {})}
    language = language or transcript_language(model)
    rates = {decoder: (metrics.TranscriptCER(language), metrics.TranscriptWER(language)) for decoder in widths}
    shown: list[dict[str, str]] = []
    utterances = 0
    was_training = model.training
    model.to(device).eval()
    try:
        for batch in batches:
            batch = to_device(batch, device, modalities)
            references = list(batch["transcript"])
            for decoder, width in widths.items():
                hypotheses = list(model.transcribe(batch, beam_size=width))  # type: ignore[operator]
                for metric in rates[decoder]:
                    metric.update(hypotheses, references)
                if decoder == "greedy":
                    pairs = zip(references, hypotheses, strict=False)
                    shown += [{"reference": ref, "greedy": hyp} for ref, hyp in pairs][: examples - len(shown)]
            utterances += len(references)
    finally:
        model.train(was_training)
    scores: dict[str, Any] = {"utterances": utterances}
    if utterances:
        for decoder, (char, word) in rates.items():
            scores.update({f"{decoder}_cer": char.compute().item(), f"{decoder}_wer": word.compute().item()})
    scores["examples"] = shown
    return scores


# ----------------------------------------------------------------------------------------------- BEV detection


def score_detections(
    batches: Iterable[Batch], predict: Callable[[Batch], Sequence[Detections]], metric: metrics.DetectionMAP,
    on_batch: BatchHook | None = None,
) -> tuple[list[Detections], list[str]]:
    """Update ``metric`` with each batch's predictions and ground truth; return the predictions and sample tokens."""
    preds: list[Detections] = []
    tokens: list[str] = []
    for batch in tqdm(batches, desc="bev eval", unit="batch", disable=None):
        truths = batch_ground_truth(batch)
        keys = list(batch.get("__key__") or [f"sample{len(tokens) + i}" for i in range(len(truths))])
        detections = list(predict(batch))
        if len(detections) != len(truths):
            raise ValueError(f"the detector returned {len(detections)} predictions for a batch of {len(truths)}")
        metric.update(detections, truths)
        if on_batch is not None:
            on_batch(batch, detections, truths, keys)
        preds += detections
        tokens += keys
    return preds, tokens


def evaluate_bev(
    model: Detector,
    loader: Iterable[Batch],
    classes: Sequence[str],
    *,
    device: str | torch.device | None = None,
    modalities: Sequence[Modality] = (),
    results_path: str | Path | None = None,
    results_meta: Mapping[str, bool] | None = None,
    on_batch: BatchHook | None = None,
    **metric_options: Any,
) -> dict[str, Any]:
    """nuScenes-style metrics (:mod:`xmodal.eval.bev`) of a detector (``model.predict(batch)``) over a BEV loader.

    Args:
        model: an ``nn.Module`` is put in eval mode (and moved to ``device``) for the run, then restored.
        loader: yields BEV batches (:class:`~xmodal.modalities.bev.BEVModality` fields and ``__key__``).
        classes: class names in label order.
        device: where to run; ``None`` keeps the model where it is.
        modalities: plug-ins whose ``on_device`` runs on each batch after the move (uint8 camera -> float).
        results_path: also write the predictions there as a nuScenes results JSON (``results_meta`` its meta).
        on_batch: called with each batch, its predictions, ground truth and tokens (e.g.
            :class:`xmodal.render.BEVRenders`).
        metric_options: keyword arguments of :func:`~xmodal.eval.bev.detection_metrics`.

    Returns:
        :func:`~xmodal.eval.bev.detection_metrics`' dict, plus ``results_json`` (its path) when written.
    """
    from xmodal.data.wds import move_batch, prepare_on_device

    metric = metrics.DetectionMAP(classes, metric_options)
    with evaluating(cast(Any, model), device) as dev, torch.inference_mode():

        def predict(batch: Batch) -> list[Detections]:
            outputs = model.predict(prepare_on_device(move_batch(batch, dev), modalities, train=False))
            return [{k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in det.items()} for det in outputs]

        preds, tokens = score_detections(loader, predict, metric, on_batch)
    scores = metric.compute()
    if results_path is not None:
        scores["results_json"] = str(write_results(results_path, preds, tokens, classes, results_meta))
    return scores


def evaluate_results(
    results: Mapping[str, Detections],
    loader: Iterable[Batch],
    classes: Sequence[str],
    *,
    on_batch: BatchHook | None = None,
    **metric_options: Any,
) -> dict[str, Any]:
    """Metrics of stored predictions (:func:`~xmodal.eval.bev.read_results`' dict) against a BEV loader's ground truth.

    Samples missing from ``results`` count as having no prediction (``samples_without_results`` says how many);
    results for a sample token the loader does not have raise ``ValueError`` (a wrong split, most likely).
    """
    empty = {"boxes": torch.zeros(0, 7), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}

    def predict(batch: Batch) -> list[Detections]:
        return [results.get(key, empty) for key in batch["__key__"]]

    metric = metrics.DetectionMAP(classes, metric_options)
    _, tokens = score_detections(loader, predict, metric, on_batch)
    unknown = sorted(set(results) - set(tokens))
    if unknown:
        raise ValueError(f"{len(unknown)} sample tokens of the results are not in the ground truth, e.g. "
                         f"{unknown[:3]}")
    scores = metric.compute()
    scores["samples_without_results"] = sum(token not in results for token in tokens)
    return scores
