"""Image-text retrieval: recall@k in both directions, on shard loaders or COCO/Flickr caption files.

Conventions (those of the COCO/Flickr30k benchmarks):

* several captions may belong to one image. Text->image has one correct image per caption; image->text is a
  hit at ``k`` when ANY of the image's captions is in the top ``k``.
* ties are broken against the model: a query is a hit at ``k`` when fewer than ``k`` wrong candidates score at
  least as high as its best-scoring correct candidate (``sum(sim[wrong] >= max(sim[correct])) < k``). So a
  collapsed model whose similarities are all equal never gets a perfect score. NaN scores count as ``-inf``.

Caption files, autodetected:

* Karpathy splits: ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}, ...]}``;
* COCO annotations: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from xmodal.eval.folders import ImageFiles, image_loader
from xmodal.eval.zeroshot import DualEncoder, encode_texts, evaluating

GroundTruth = Sequence[set[int]] | Sequence[Sequence[int]] | Tensor


def recall_at_k(sim: Tensor, gt: GroundTruth, ks: Sequence[int] = (1, 5, 10), chunk: int = 4096) -> dict[str, float]:
    """Fraction of queries with a correct candidate in the top ``k`` (ties against the model).

    Args:
        sim: ``Nq x Ng`` query-candidate similarities.
        gt: the correct candidates of each query: a list of ``Nq`` sets of indices, a bool ``Nq x Ng`` matrix,
            or a LongTensor ``Nq`` (one correct candidate per query). Every query needs at least one.
        ks: the ``k`` values; ``k >= Ng`` always scores 1.0.
        chunk: queries compared at once (bounds memory on big galleries).

    Returns:
        ``{"R@1": ..., "R@5": ..., "R@10": ...}`` as fractions in [0, 1].
    """
    mask = _gt_mask(gt, sim.shape, sim.device)
    if not bool(mask.any(1).all()):
        empty = (~mask.any(1)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"every query needs at least one correct candidate; queries {empty}... have none")
    ranks = []
    for start in range(0, sim.shape[0], chunk):
        s = sim[start : start + chunk].float().nan_to_num(nan=float("-inf"))
        m = mask[start : start + chunk]
        best = s.masked_fill(~m, float("-inf")).amax(1, keepdim=True)
        ranks.append(((s >= best) & ~m).sum(1))
    rank = torch.cat(ranks)
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


def retrieval_metrics(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image recall@k from embeddings.

    Args:
        image_emb: ``Ni x D`` image embeddings.
        text_emb: ``Nt x D`` caption embeddings.
        text_to_image: ``Nt`` index of the image each caption belongs to; every image needs a caption.
        ks: the ``k`` values.

    Returns:
        ``{"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", ...}`` as fractions in [0, 1].
    """
    text_to_image = text_to_image.to(text_emb.device).long()
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({text_emb.shape[0]},)")
    return retrieval_by_mask(image_emb, text_emb, F.one_hot(text_to_image, image_emb.shape[0]).bool(), ks)


def retrieval_by_mask(
    image_emb: Tensor, text_emb: Tensor, mask: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """:func:`retrieval_metrics` with the correct caption-image pairs given as a bool ``Nt x Ni`` matrix."""
    image_emb, text_emb = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    sim = text_emb @ image_emb.T  # Nt x Ni
    t2i, i2t = recall_at_k(sim, mask, ks), recall_at_k(sim.T, mask.T, ks)
    return {**{f"i2t_{k}": v for k, v in i2t.items()}, **{f"t2i_{k}": v for k, v in t2i.items()}}


@torch.inference_mode()
def evaluate_retrieval(
    model: DualEncoder,
    loader: Iterable[Mapping[str, Any]],
    device: str | torch.device | None = None,
    ks: Sequence[int] = (1, 5, 10),
    identical_captions_match: bool = False,
) -> dict[str, float]:
    """Retrieval recall@k on a loader of image-caption pairs, one caption per image (the shards case).

    Args:
        model: has ``encode_image`` and ``encode_text``; put in eval mode for the run, then restored.
        loader: yields dicts with ``image`` (uint8 or float ``B x 3 x H x W``) and ``caption`` (``B`` strings).
        device: where to run (the model is moved there); ``None`` keeps the model where it is.
        ks: the ``k`` values.
        identical_captions_match: count a caption as correct for every image whose own caption is the same
            string (and vice versa). Synthetic corpora repeat captions verbatim; without this, a model cannot
            tell which of several identically described images a caption "belongs" to, and ties count against it.

    Returns:
        :func:`retrieval_metrics` keys plus ``n_images`` and ``n_texts``.
    """
    image_embs, text_embs, captions = [], [], []
    with evaluating(model, device) as dev:
        for batch in tqdm(loader, desc="retrieval", disable=None):
            image_embs.append(model.encode_image(batch["image"].to(dev, non_blocking=True)).float())
            text_embs.append(model.encode_text(list(batch["caption"])).float().to(dev))
            captions.extend(batch["caption"])
    image_emb, text_emb = torch.cat(image_embs), torch.cat(text_embs)
    n = image_emb.shape[0]
    if identical_captions_match:
        metrics = same_text_retrieval(image_emb, text_emb, captions, ks)
    else:
        metrics = retrieval_metrics(image_emb, text_emb, torch.arange(n, device=text_emb.device), ks)
    return {**metrics, "n_images": n, "n_texts": n}


def same_text_retrieval(
    image_emb: Tensor, text_emb: Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k for ``N`` paired images/captions: caption ``t`` is correct for image ``i`` iff their strings match."""
    ids = {text: i for i, text in enumerate(dict.fromkeys(captions))}
    caption_ids = torch.tensor([ids[c] for c in captions], device=text_emb.device)
    return retrieval_by_mask(image_emb, text_emb, caption_ids[:, None] == caption_ids[None, :], ks)


def load_captions(captions_json: str | Path, split: str | None = None) -> list[tuple[str, list[str]]]:
    """``(relative image path, captions)`` per image from a Karpathy or COCO caption file (autodetected).

    Args:
        captions_json: the JSON file.
        split: keep only images whose ``split`` field equals this (Karpathy files: ``"test"``, ``"val"``...).

    Images without captions are dropped.
    """
    data = json.loads(Path(captions_json).read_text())
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{captions_json}: not a Karpathy or COCO caption file (no 'images' list)")
    if split is not None:
        if not any("split" in img for img in images):
            raise ValueError(f"{captions_json}: split={split!r} asked for, but its images have no 'split' field")
        images = [img for img in images if img.get("split") == split]
    if "annotations" in data:
        by_id: dict[Any, list[str]] = {img["id"]: [] for img in images}
        for ann in data["annotations"]:
            if ann["image_id"] in by_id:
                by_id[ann["image_id"]].append(ann["caption"].strip())
        pairs = [(img["file_name"], by_id[img["id"]]) for img in images]
    elif all("sentences" in img for img in images):
        pairs = [
            (str(Path(img.get("filepath", "")) / img["filename"]), [s["raw"].strip() for s in img["sentences"]])
            for img in images
        ]
    else:
        raise ValueError(f"{captions_json}: neither COCO ('annotations') nor Karpathy ('sentences' per image) format")
    return [(path, caps) for path, caps in pairs if caps]


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
) -> dict[str, float]:
    """Retrieval recall@k on a COCO/Flickr caption file, with all of each image's captions.

    Args:
        model: has ``encode_image`` and ``encode_text``; put in eval mode for the run, then restored.
        captions_json: a Karpathy-split or COCO-annotations JSON (see the module docstring).
        image_root: the folder that image paths in the JSON are relative to.
        image_size: side images are decoded to (the model resizes again to its own input size).
        batch_size: images (and captions) per batch.
        split: keep only this split (Karpathy files); ``None`` keeps every image.
        device: where to run; ``None`` keeps the model where it is.
        num_workers: data-loader worker processes.
        ks: the ``k`` values.

    Returns:
        :func:`retrieval_metrics` keys plus ``n_images`` and ``n_texts``.
    """
    pairs = load_captions(captions_json, split)
    if not pairs:
        raise ValueError(f"{captions_json}: no captioned images" + (f" in split {split!r}" if split else ""))
    captions = [cap for _, caps in pairs for cap in caps]
    text_to_image = torch.tensor([i for i, (_, caps) in enumerate(pairs) for _ in caps])
    loader = image_loader(ImageFiles([Path(image_root) / p for p, _ in pairs], image_size), batch_size, num_workers)
    with evaluating(model, device) as dev:
        batches = tqdm(loader, desc="retrieval images", disable=None)
        image_emb = torch.cat([model.encode_image(b["image"].to(dev, non_blocking=True)).float() for b in batches])
        text_emb = encode_texts(model, captions, batch_size).to(dev)
    metrics = retrieval_metrics(image_emb, text_emb, text_to_image, ks)
    return {**metrics, "n_images": len(pairs), "n_texts": len(captions)}


def _gt_mask(gt: GroundTruth, shape: torch.Size, device: torch.device) -> Tensor:
    """``gt`` in any accepted form as a bool ``Nq x Ng`` matrix."""
    nq, ng = shape
    if isinstance(gt, Tensor):
        if gt.dtype == torch.bool:
            if gt.shape != (nq, ng):
                raise ValueError(f"gt mask has shape {tuple(gt.shape)}, similarities {(nq, ng)}")
            return gt.to(device)
        if gt.shape != (nq,):
            raise ValueError(f"gt indices have shape {tuple(gt.shape)}, expected ({nq},)")
        return F.one_hot(gt.long().to(device), ng).bool()
    if len(gt) != nq:
        raise ValueError(f"gt has {len(gt)} entries for {nq} queries")
    pairs = [(i, j) for i, correct in enumerate(gt) for j in correct]
    mask = torch.zeros(nq, ng, dtype=torch.bool)
    if pairs:
        rows, cols = zip(*pairs, strict=True)
        mask[list(rows), list(cols)] = True
    return mask.to(device)
