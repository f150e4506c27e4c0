"""Relational losses: the student matches the *structure* of the teacher's embeddings, not the embeddings.

* :class:`RKDLoss`: distances and angles between the samples of a batch (Park et al., CVPR 2019).
* :class:`TRGLoss`: a graph whose nodes are tokens (patches, positions) and whose edges are token similarities,
  plus a contextual loss on the token-token similarities inside each instance (Zhang et al., 2023).

Relations are width-independent, so RKD needs no projector; TRG learns one for its node term when the widths
differ. Teacher tensors are always detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.contracts import Batch, DistillLoss, Keys
from xmodal.losses.features import make_projector, to_tokens
from xmodal.losses.normalize import NormOption, target_norm


def pairwise_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between rows.

    Args:
        x: ``B x D``.
        eps: floor under the squared distance before the square root (keeps gradients finite at 0).

    Returns:
        ``B x B`` with ``d[i, j] = ||x_i - x_j||`` and an exact zero diagonal.
    """
    x = x - x.mean(0, keepdim=True)  # translation-invariant; smaller numbers for the Gram formula
    gram = x @ x.t()
    sq = gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram
    off = 1 - torch.eye(len(x), device=x.device, dtype=x.dtype)
    return sq.clamp(min=eps).sqrt() * off


def normalized_distances(x: Tensor) -> Tensor:
    """RKD's distance potential ``psi_D(i, j) = ||x_i - x_j|| / mu`` with ``mu`` the mean off-diagonal distance.

    Args:
        x: ``B x D`` with ``B >= 2``.

    Returns:
        ``B x B`` (zero diagonal).
    """
    d = pairwise_distances(x)
    n = len(x)
    mu = d.sum() / (n * (n - 1))
    return d / mu.clamp(min=1e-12)


def triplet_angles(x: Tensor, eps: float = 1e-12) -> Tensor:
    """RKD's angle potential: cosines of the angle at vertex ``j`` of every triangle ``(x_i, x_j, x_k)``.

    ``psi_A(i, j, k) = <e_ij, e_kj>`` with ``e_ij = (x_i - x_j) / ||x_i - x_j||``. Computed from the Gram matrix
    ``G = X X^T`` (``<x_i - x_j, x_k - x_j> = G_ik - G_ij - G_jk + G_jj``), so memory is ``B^3``, not ``B^2 D``.

    Args:
        x: ``B x D``.
        eps: floor under norms.

    Returns:
        ``B x B x B`` tensor indexed ``[j, i, k]`` (vertex first).
    """
    x = x - x.mean(0, keepdim=True)
    gram = x @ x.t()
    diag = gram.diagonal()
    # inner[j, i, k] = G_ik - G_ij - G_jk + G_jj
    inner = gram[None, :, :] - gram.t()[:, :, None] - gram[:, None, :] + diag[:, None, None]
    dist = pairwise_distances(x).clamp(min=eps)  # dist[i, j], symmetric
    return (inner / (dist.t()[:, :, None] * dist[:, None, :])).clamp(-1.0, 1.0)


def distinct_triplets(n: int, device: torch.device) -> Tensor:
    """Boolean ``n x n x n`` mask of index triples with ``i``, ``j``, ``k`` pairwise different."""
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])


class RKDLoss(DistillLoss):
    """Relational Knowledge Distillation: match normalised pairwise distances and triplet angles.

    With ``psi_D`` (:func:`normalized_distances`) and ``psi_A`` (:func:`triplet_angles`) computed on the student's
    and the teacher's ``B x D`` embeddings of the same batch, and ``l_delta`` the Huber loss (``delta = 1``,
    i.e. smooth-L1)::

        L_D = mean_{i != j} l_delta(psi_D^s(i, j) - psi_D^t(i, j))
        L_A = mean_{i, j, k distinct} l_delta(psi_A^s(i, j, k) - psi_A^t(i, j, k))
        L = distance_weight * L_D + angle_weight * L_A

    Both terms are zero when the student equals the teacher up to a rotation, translation and scale (distances
    are divided by their mean, angles are scale-free), so no projector is needed when the widths differ. Means
    run over distinct index pairs/triples only (the reference implementation also averages in the zero diagonal).
    Inputs with more than two dimensions are flattened to ``B x -1``.

    Reference: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019 (paper defaults for metric
    learning: ``distance_weight=1``, ``angle_weight=2``).

    Args:
        student_key, teacher_key: embedding keys (e.g. ``image.emb``).
        distance_weight: ``lambda_D``.
        angle_weight: ``lambda_A``; set 0 to skip the ``O(B^3)`` angle term.
        huber_delta: ``delta`` of the Huber loss.
        normalize: target normalisation (:mod:`xmodal.losses.normalize`); default ``"none"``, as RKD: its
            potentials are already invariant to the embeddings' translation and scale.
    """

    batch_coupled = True  # distances and angles between the samples of the batch

    def __init__(
        self, student_key: Keys, teacher_key: Keys, distance_weight: float = 1.0, angle_weight: float = 2.0,
        huber_delta: float = 1.0, weight: float = 1.0, name: str | None = None, normalize: NormOption = "none",
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "rkd")
        self.target_norm = target_norm(normalize, teacher_key)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.huber_delta = huber_delta

    def distance_loss(self, s: Tensor, t: Tensor) -> Tensor:
        """``L_D`` for ``B x D`` student and teacher embeddings."""
        off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
        return F.huber_loss(normalized_distances(s)[off], normalized_distances(t)[off], delta=self.huber_delta)

    def angle_loss(self, s: Tensor, t: Tensor) -> Tensor:
        """``L_A`` for ``B x D`` student and teacher embeddings (0 when ``B < 3``)."""
        if len(s) < 3:
            return s.sum() * 0
        mask = distinct_triplets(len(s), s.device)
        return F.huber_loss(triplet_angles(s)[mask], triplet_angles(t)[mask], delta=self.huber_delta)

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        s = self.target_norm.student(s.float()).flatten(1)
        t = self.target_norm.teacher(t.detach().float()).flatten(1)
        if len(s) < 2:
            raise ValueError(f"loss {self.name!r}: RKD needs at least 2 samples per batch, got {len(s)}")
        loss = self.distance_weight * self.distance_loss(s, t) if self.distance_weight else s.sum() * 0
        if self.angle_weight:
            loss = loss + self.angle_weight * self.angle_loss(s, t)
        return loss


def match_grids(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the finer of two ``B x C x H x W`` maps to the coarser grid; tokens must already agree."""
    if s.dim() == 4 and t.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
    return s, t


def info_nce(query: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """``mean_i -log softmax_j(<q_i, k_j> / tau)[i]`` for L2-normalised ``M x D`` rows (positives on the diagonal)."""
    logits = query @ keys.t() / temperature
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def edge_kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """Mean over nodes ``i`` of ``KL(A^t_i || A^s_i)`` with ``A_i = softmax_{j != i}(<z_i, z_j> / tau)``.

    Args:
        s, t: L2-normalised node embeddings ``M x D_s`` and ``M x D_t`` (``M >= 2``).
    """
    self_mask = torch.eye(len(s), dtype=torch.bool, device=s.device)
    log_a_s = F.log_softmax((s @ s.t() / temperature).masked_fill(self_mask, float("-inf")), -1)
    log_a_t = F.log_softmax((t @ t.t() / temperature).masked_fill(self_mask, float("-inf")), -1)
    # the masked diagonal is -inf on both sides: drop it so that 0 * (-inf - -inf) never appears
    log_a_s, log_a_t = log_a_s[~self_mask].view(len(s), -1), log_a_t[~self_mask].view(len(s), -1)
    return (log_a_t.exp() * (log_a_t - log_a_s)).sum(-1).mean()


class TRGLoss(DistillLoss):
    """Token-level Relationship Graph distillation: nodes, edges and in-instance context of token features.

    Student tokens ``S`` (``B x N x D_s``) go through a learned projector ``P`` when ``D_s != D_t``; every token is
    L2-normalised: ``z^s = norm(P(S))``, ``z^t = norm(T)``. ``B x C x H x W`` maps become ``H W`` tokens (the finer
    grid is average-pooled to the coarser one). The graph's nodes are ``M = min(B N, num_nodes)`` token positions
    drawn at random from the batch (the same positions for both models); with ``tau`` the temperature::

        L_node = mean_i -log softmax_j(<z^s_i, z^t_j> / tau)[i]            (node alignment, InfoNCE over nodes)
        L_edge = mean_i KL(A^t_i || A^s_i),  A_i = softmax_{j != i}(<z_i, z_j> / tau)   (edge / graph matching)
        L_ctx  = mean_b mean_{n, m} (<z^s_bn, z^s_bm> - <z^t_bn, z^t_bm>)^2           (contextual, per instance)
        L = node_weight * L_node + edge_weight * L_edge + context_weight * L_ctx

    ``L_edge`` and ``L_ctx`` vanish when the student's tokens equal the teacher's; ``L_node`` is then the InfoNCE
    floor of the teacher's own graph, not zero. This is our reading of the paper: the graph over tokens of the
    batch is matched at node level and edge level, and the contextual loss compares each instance's token-token
    similarity matrix; the paper's exact node/edge losses may differ in normalisation.

    Reference: Zhang, Liu, He, "Knowledge Distillation via Token-level Relationship Graph", arXiv:2306.12442, 2023.

    Args:
        student_key, teacher_key: token keys (``B x N x D`` or ``B x C x H x W``), e.g. ``image.tokens``.
        student_dim, teacher_dim: token widths; a linear projector is learned when they differ.
        temperature: ``tau`` of the node and edge softmaxes.
        num_nodes: most graph nodes per batch (cost is ``O(M^2)``); ``None`` uses every token.
        node_weight, edge_weight, context_weight: weights of the three terms.
        normalize: target normalisation (:mod:`xmodal.losses.normalize`); default ``"none"``, as the paper: tokens
            are L2-normalised anyway (so ``"l2"`` changes nothing), ``"standardize"`` removes the teacher's mean
            token first.
    """

    batch_coupled = True  # the token graph spans all samples of the batch

    def __init__(
        self, student_key: Keys, teacher_key: Keys, student_dim: int | None = None, teacher_dim: int | None = None,
        temperature: float = 0.1, num_nodes: int | None = 512, node_weight: float = 1.0, edge_weight: float = 1.0,
        context_weight: float = 1.0, weight: float = 1.0, name: str | None = None, normalize: NormOption = "none",
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "trg")
        self.projector = make_projector(student_dim, teacher_dim)
        self.target_norm = target_norm(normalize, teacher_key)
        self.temperature = temperature
        self.num_nodes = num_nodes
        self.node_weight = node_weight
        self.edge_weight = edge_weight
        self.context_weight = context_weight

    def tokens(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised ``B x N x D'`` token embeddings of student (projected) and teacher."""
        s, t = match_grids(s.float(), self.target_norm.teacher(t.detach().float()))
        if s.dim() == 2 or t.dim() == 2:
            raise ValueError(f"expected B x N x D tokens or B x C x H x W maps, got shapes {tuple(s.shape)}, "
                             f"{tuple(t.shape)}")
        s, t = to_tokens(s), to_tokens(t)
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(f"loss {self.name!r}: student tokens {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                             "batch and token counts must agree")
        zs = self.projector(s)
        if zs.shape[-1] != t.shape[-1]:
            raise ValueError(f"loss {self.name!r}: token widths {zs.shape[-1]} vs {t.shape[-1]}; "
                             "set student_dim and teacher_dim to learn a projector")
        return F.normalize(zs, dim=-1), F.normalize(t, dim=-1)

    def nodes(self, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        """The graph's ``M x D`` nodes: all ``B N`` tokens, or ``num_nodes`` positions drawn without replacement."""
        zs, zt = zs.flatten(0, 1), zt.flatten(0, 1)
        if self.num_nodes is not None and len(zs) > self.num_nodes:
            pick = torch.randperm(len(zs), device=zs.device)[: self.num_nodes]
            zs, zt = zs[pick], zt[pick]
        return zs, zt

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        zs, zt = self.tokens(s, t)
        loss = zs.sum() * 0
        ns, nt = self.nodes(zs, zt)
        if self.node_weight:
            loss = loss + self.node_weight * info_nce(ns, nt, self.temperature)
        if self.edge_weight and len(ns) > 1:
            loss = loss + self.edge_weight * edge_kl(ns, nt, self.temperature)
        if self.context_weight:
            context = (zs @ zs.transpose(1, 2) - zt @ zt.transpose(1, 2)).pow(2).mean()
            loss = loss + self.context_weight * context
        return loss
