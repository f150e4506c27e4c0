"""Image-text retrieval: recall@k in both directions, from embeddings (the rank rules of
:class:`xmodal.eval.metrics.RetrievalRecall`; the loops over loaders are in :mod:`xmodal.eval.loops`).

Conventions (those of the COCO/Flickr30k benchmarks):

* several captions may belong to one image. Text->image has one correct image per caption; image->text is a
  hit at ``k`` when ANY of the image's captions is in the top ``k``.
* ties are broken against the model: a query is a hit at ``k`` when fewer than ``k`` wrong candidates score at
  least as high as its best-scoring correct candidate (``sum(sim[wrong] >= max(sim[correct])) < k``). So a
  collapsed model whose similarities are all equal never gets a perfect score. NaN scores count as ``-inf``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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
