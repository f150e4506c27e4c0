"""Losses for retrieval and ranking students distilled from cross-encoder (cross-attentive) teachers.

* :class:`MarginMSELoss`: the student's margin between a positive and a negative passage regresses the
  teacher's margin (Hofstätter et al., 2020).
* :class:`DSELoss`: a bi-encoder's pair score, computed from two sentence embeddings by a small head, regresses
  the cross-attentive teacher's pair logits (Barkan et al., AAAI 2020).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss, Keys

Similarity = Literal["dot", "cosine"]


def similarity(query: Tensor, docs: Tensor, kind: Similarity = "dot") -> Tensor:
    """Scores of each query against its own document(s).

    Args:
        query: ``B x D``.
        docs: ``B x D`` (one document per query) or ``B x K x D`` (``K`` documents per query).
        kind: ``"dot"`` or ``"cosine"``.

    Returns:
        ``B`` or ``B x K``.
    """
    if kind == "cosine":
        query, docs = F.normalize(query, dim=-1), F.normalize(docs, dim=-1)
    if docs.dim() == 3:
        return torch.einsum("bd,bkd->bk", query, docs)
    return (query * docs).sum(-1)


def margins(x: Tensor | Sequence[Tensor], kind: Similarity = "dot") -> Tensor:
    """``s(q, p+) - s(q, p-)`` as ``B x K`` (``K`` negatives per query) from scores or embeddings.

    Accepted forms:

    * a ``B x (1 + K)`` tensor: column 0 is the positive's score, the others are negatives' scores;
    * ``(pos, neg)``: scores ``B`` (or ``B x 1``) and ``B`` or ``B x K``;
    * ``(query, pos, neg)``: embeddings ``B x D``, ``B x D``, ``B x D`` or ``B x K x D``; scores by ``kind``.
    """
    if isinstance(x, Tensor):
        if x.dim() != 2 or x.shape[1] < 2:
            raise ValueError(f"expected B x (1 + K) scores with the positive first, got shape {tuple(x.shape)}")
        pos, neg = x[:, 0], x[:, 1:]
    elif len(x) == 2:
        pos, neg = x
    elif len(x) == 3:
        pos, neg = similarity(x[0], x[1], kind), similarity(x[0], x[2], kind)
    else:
        raise ValueError(f"expected (pos, neg) scores or (query, pos, neg) embeddings, got {len(x)} tensors")
    pos = pos.float().reshape(len(pos), -1)
    neg = neg.float().reshape(len(neg), -1)
    if pos.shape[1] != 1:
        raise ValueError(f"one positive score per query expected, got shape {tuple(pos.shape)}")
    return pos - neg


class MarginMSELoss(DistillLoss):
    """Margin-MSE: ``MSE(s(q, p+) - s(q, p-), t(q, p+) - t(q, p-))``, averaged over queries (and negatives).

    Only score *differences* are matched, so a dot-product bi-encoder student can learn from a cross-encoder
    teacher whose scores live on another scale. Student and teacher inputs take any form of :func:`margins`:
    e.g. ``student_key=["query.emb", "pos.emb", "neg.emb"]`` (scores by ``similarity``) and
    ``teacher_key=["pos.score", "neg.score"]``. ``K`` negatives per query give ``K`` margins each.

    Reference: Hofstätter, Althammer, Schröder, Sertkan, Hanbury, "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation", arXiv:2010.02666, 2020.

    Args:
        student_key, teacher_key: score key(s) or embedding keys, see above.
        similarity: ``"dot"`` (the paper's BERT-dot student) or ``"cosine"``, for embedding inputs.
    """

    def __init__(
        self, student_key: Keys, teacher_key: Keys, similarity: Similarity = "dot", weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "margin_mse")
        self.similarity = similarity

    def forward(self, s: Tensor | tuple[Tensor, ...], t: Tensor | tuple[Tensor, ...], batch: Batch) -> Tensor:
        t = t.detach() if isinstance(t, Tensor) else tuple(x.detach() for x in t)
        student, teacher = margins(s, self.similarity), margins(t, self.similarity)
        if student.shape != teacher.shape:
            raise ValueError(f"loss {self.name!r}: student margins {tuple(student.shape)} vs teacher "
                             f"{tuple(teacher.shape)}")
        return F.mse_loss(student, teacher)


def pair_features(u: Tensor, v: Tensor) -> Tensor:
    """DSE's "concat-compare" pair representation ``[u, v, u * v, |u - v|]``: ``B x 4D`` from two ``B x D``."""
    return torch.cat([u, v, u * v, (u - v).abs()], dim=-1)


def mlp(sizes: Sequence[int]) -> nn.Module:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class DSELoss(DistillLoss):
    """Distilled Sentence Embedding: a bi-encoder's pair logits regress a cross-attentive teacher's logits.

    The student embeds the two sentences separately (``u``, ``v``: ``B x D``, read from ``student_key=[a, b]``);
    a small head owned by this loss (trained with the student) turns them into ``K`` pair logits ``z^s``:

    * ``head="concat"``: ``z^s = MLP([u, v, u * v, |u - v|])`` with ReLU hidden layers ``hidden_dims``;
    * ``head="dot"``: ``z^s = a * <u, v> + b`` (``K`` learned ``a``, ``b``); ``head="cosine"``: the same on
      ``cos(u, v)``.

    With the teacher's pair logits ``z^t`` (``B x K`` or ``B``) and labels ``y`` (``batch["label"]``, needed only
    when ``distill_coeff < 1``)::

        L = distill_coeff * mean_b sum_k (z^s_bk - z^t_bk)^2 + (1 - distill_coeff) * CE(z^s, y)

    At inference only the sentence embeddings are needed: candidates are embedded once and scored by the head.

    Reference: Barkan, Razin, Malkiel, Katz, Caciularu, Koenigstein, "Scalable Attentive Sentence-Pair Modeling
    via Distilled Sentence Embedding", AAAI 2020.

    Args:
        student_key: the two sentence-embedding keys, e.g. ``["text_a.emb", "text_b.emb"]``.
        teacher_key: the teacher's pair logits, e.g. ``"pair.logits"``.
        embed_dim: sentence-embedding width ``D`` (needed by ``head="concat"``).
        num_outputs: ``K``, the number of teacher logits (1 for a single score).
        head: ``"concat"``, ``"dot"`` or ``"cosine"``.
        hidden_dims: hidden widths of the ``concat`` MLP (empty: one linear layer).
        distill_coeff: weight of the logit regression; ``1 - distill_coeff`` goes to the label cross-entropy.
    """

    def __init__(
        self, student_key: Keys, teacher_key: Keys, embed_dim: int | None = None, num_outputs: int = 1,
        head: Literal["concat", "dot", "cosine"] = "concat", hidden_dims: Sequence[int] = (),
        distill_coeff: float = 1.0, weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "dse")
        self.head_type = head
        self.num_outputs = num_outputs
        self.distill_coeff = distill_coeff
        if head == "concat":
            if embed_dim is None:
                raise ValueError("DSELoss(head='concat') needs embed_dim")
            self.head: nn.Module = mlp([4 * embed_dim, *hidden_dims, num_outputs])
        elif head in ("dot", "cosine"):
            self.head = nn.Linear(1, num_outputs)
            nn.init.ones_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            raise ValueError(f"unknown DSE head {head!r}; use 'concat', 'dot' or 'cosine'")

    def pair_logits(self, u: Tensor, v: Tensor) -> Tensor:
        """Student pair logits ``B x K`` from sentence embeddings ``u``, ``v`` (``B x D``)."""
        u, v = u.float(), v.float()
        if self.head_type == "concat":
            return self.head(pair_features(u, v))
        score = F.cosine_similarity(u, v, dim=-1) if self.head_type == "cosine" else (u * v).sum(-1)
        return self.head(score[:, None])

    def forward(self, s: tuple[Tensor, Tensor], t: Tensor, batch: Batch) -> Tensor:
        if isinstance(s, Tensor) or len(s) != 2:
            raise ValueError(f"loss {self.name!r}: student_key must name the two sentence embeddings")
        student = self.pair_logits(*s)
        teacher = t.detach().float().reshape(len(student), -1)
        if teacher.shape != student.shape:
            raise ValueError(f"loss {self.name!r}: teacher logits {tuple(teacher.shape)} vs student "
                             f"{tuple(student.shape)}; set num_outputs to the teacher's width")
        loss = self.distill_coeff * (student - teacher).pow(2).sum(-1).mean()
        if self.distill_coeff < 1:
            if "label" not in batch:
                raise KeyError(f"loss {self.name!r}: distill_coeff < 1 needs batch['label']")
            loss = loss + (1 - self.distill_coeff) * F.cross_entropy(student, batch["label"])
        return loss
