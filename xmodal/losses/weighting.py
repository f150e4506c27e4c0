"""Sample-wise weighting of the teacher's soft labels against the ground truth: TGeo-KD.

:class:`TGeoKDLoss` mixes per-sample KD and cross-entropy with a fusion ratio ``alpha_i`` that a small network
owned by the loss predicts from the trilateral geometry of student prediction ``S``, teacher prediction ``T``,
ground truth ``G`` and the teacher's class-mean prediction ``T_bar``. The paper learns that network by bilevel
optimisation (outer objective: the student's loss on held-out data after an inner update). Here the outer step
is :func:`tgeo_meta_step`, driven during training by :class:`xmodal.callbacks.TGeoKDMetaCallback`; see
:func:`tgeo_meta_step`'s docstring for the exact first-order approximation. The ratio network is never trained by the
student's own loss (which would simply put all weight on the smaller of the two terms): ``forward`` computes
``alpha`` without gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss, Keys

LogitsFn = Callable[[Batch], Tensor]


def kd_per_sample(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))`` for each row: ``B`` from ``B x C`` logits."""
    log_p_s = F.log_softmax(student.float() / temperature, -1)
    log_p_t = F.log_softmax(teacher.float() / temperature, -1)
    return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def trilateral_features(student: Tensor, teacher: Tensor, truth: Tensor, class_mean: Tensor) -> Tensor:
    """The relation vectors among the four points ``S``, ``T``, ``G``, ``T_bar`` of the probability simplex.

    Intra-sample (the triangle ``S T G``): ``S - T`` (how well the student mimics the teacher), ``T - G`` (the
    teacher's error), ``G - S`` (the student's error). Inter-sample (against the class mean ``T_bar``, which
    damps outlying teacher predictions): ``T_bar - S``, ``T_bar - T``, ``T_bar - G``.

    Args:
        student, teacher: probabilities ``B x C``.
        truth: one-hot ground truth ``B x C``.
        class_mean: the teacher's mean prediction over the true class of each sample, ``B x C``.

    Returns:
        ``B x 6C``.
    """
    s, t, g, m = student, teacher, truth, class_mean
    return torch.cat([s - t, t - g, g - s, m - s, m - t, m - g], dim=-1)


class TGeoKDLoss(DistillLoss):
    """TGeo-KD: per-sample fusion of KD and CE with a ratio learned from trilateral geometry.

    With student/teacher logits ``z^s``, ``z^t`` (``B x C``), labels ``y = batch["label"]`` and
    ``alpha_i = sigmoid(MLP(trilateral_features(S_i, T_i, G_i, T_bar_{y_i})))`` (computed without gradient)::

        L = mean_i [ alpha_i * KD_i + (1 - alpha_i) * CE_i ]
        KD_i = tau^2 KL(softmax(z^t_i / tau) || softmax(z^s_i / tau)),   CE_i = -log softmax(z^s_i)[y_i]

    ``S``, ``T`` are softmax probabilities (``tau = 1``), ``G`` is one-hot, and ``T_bar_c`` is an exponential
    moving average (``momentum``) of the teacher's mean prediction over training samples of class ``c`` (kept in a
    buffer, saved with the model; a class not seen yet uses the sample's own ``T``). The MLP's last layer starts at
    zero, so ``alpha = init_ratio`` everywhere until :class:`~xmodal.callbacks.TGeoKDMetaCallback` (or your own calls to
    :func:`tgeo_meta_step`) trains it; without the callback this is plain fixed-ratio KD + CE.

    Reference: Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu, "Less or More From Teacher: Exploiting Trilateral Geometry
    For Knowledge Distillation", ICLR 2024.

    Args:
        student_key, teacher_key: logits keys (``B x C``).
        num_classes: ``C``.
        temperature: ``tau`` of the KD term.
        hidden_dim: hidden width of the ratio MLP.
        momentum: EMA momentum of the class means ``T_bar``.
        init_ratio: ``alpha`` before any meta update.
    """

    class_mean: Tensor
    class_seen: Tensor

    def __init__(
        self, student_key: Keys, teacher_key: Keys, num_classes: int, temperature: float = 1.0, hidden_dim: int = 64,
        momentum: float = 0.9, init_ratio: float = 0.5, weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "tgeo_kd")
        if not 0 < init_ratio < 1:
            raise ValueError(f"init_ratio must be in (0, 1), got {init_ratio}")
        self.num_classes = num_classes
        self.temperature = temperature
        self.momentum = momentum
        self.ratio_net = nn.Sequential(nn.Linear(6 * num_classes, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))
        last = self.ratio_net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)  # alpha = init_ratio for every sample until the first meta step
        nn.init.constant_(last.bias, math.log(init_ratio / (1 - init_ratio)))
        self.register_buffer("class_mean", torch.zeros(num_classes, num_classes))
        self.register_buffer("class_seen", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update_class_means(self, teacher_prob: Tensor, labels: Tensor) -> None:
        """Fold the batch's per-class mean teacher prediction into the ``T_bar`` buffer (no host sync)."""
        sums = torch.zeros_like(self.class_mean).index_add_(0, labels, teacher_prob.to(self.class_mean.dtype))
        counts = torch.bincount(labels, minlength=self.num_classes)
        present = counts > 0
        batch_mean = sums / counts.clamp(min=1)[:, None]
        blended = self.momentum * self.class_mean + (1 - self.momentum) * batch_mean
        updated = torch.where(self.class_seen[:, None], blended, batch_mean)
        self.class_mean.copy_(torch.where(present[:, None], updated, self.class_mean))
        self.class_seen |= present

    def features(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Detached ratio-network inputs ``B x 6C`` from logits ``B x C`` and labels ``B``."""
        s_prob = F.softmax(student.detach().float(), -1)
        t_prob = F.softmax(teacher.detach().float(), -1)
        truth = F.one_hot(labels, self.num_classes).float()
        seen = self.class_seen[labels][:, None]
        mean = torch.where(seen, self.class_mean[labels], t_prob)
        return trilateral_features(s_prob, t_prob, truth, mean)

    def ratio(self, features: Tensor) -> Tensor:
        """Fusion ratios ``alpha`` in (0, 1), ``B``."""
        return torch.sigmoid(self.ratio_net(features)).squeeze(-1)

    def terms(self, student: Tensor, teacher: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample ``KD_i`` and ``CE_i`` (each ``B``)."""
        kd = kd_per_sample(student, teacher.detach(), self.temperature)
        ce = F.cross_entropy(student.float(), labels, reduction="none")
        return kd, ce

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        if "label" not in batch:
            raise KeyError(f"loss {self.name!r} needs batch['label']")
        labels = batch["label"]
        t = t.detach()
        if self.training:
            self.update_class_means(F.softmax(t.float(), -1), labels)
        with torch.no_grad():
            alpha = self.ratio(self.features(s, t, labels))
        kd, ce = self.terms(s, t, labels)
        return (alpha * kd + (1 - alpha) * ce).mean()


def _shift(params: Sequence[Tensor], direction: Sequence[Tensor], step: float) -> None:
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(d, alpha=step)


def tgeo_meta_step(
    loss: TGeoKDLoss, student_logits: LogitsFn, teacher_logits: LogitsFn, params: Sequence[Tensor],
    train_batch: Batch, meta_batch: Batch, optimizer: torch.optim.Optimizer, eps: float = 1e-2,
) -> dict[str, float]:
    """One outer (bilevel) update of the ratio network, first-order, by a one-step look-ahead.

    The inner problem is one SGD step of the student on ``train_batch``:
    ``theta' = theta - eta * grad_theta mean_i [alpha_i KD_i + (1 - alpha_i) CE_i]``; the outer objective is the
    cross-entropy on ``meta_batch`` (held out: not trained on yet) at ``theta'``. To first order in ``eta``::

        dL_meta(theta') / d alpha_i  ~=  -(eta / B) * h_i,     h_i = g . grad_theta (KD_i - CE_i)

    with ``g = grad_theta L_meta(theta)``. Each ``h_i`` (a directional derivative along ``g``) is obtained by a
    central finite difference, ``|g| (d_i(theta + eps g/|g|) - d_i(theta - eps g/|g|)) / (2 eps)`` with
    ``d_i = KD_i - CE_i``: two extra forward passes, no second-order autograd, no per-sample gradients. The ratio
    network then takes one ``optimizer`` step on the surrogate ``-mean_i alpha_i h_i`` (``eta`` folded into the
    optimizer's learning rate): a sample's ratio goes up when a KD step on it would lower the held-out loss
    more than a CE step. Student parameters are restored exactly and their ``.grad`` is left untouched.

    Args:
        loss: the :class:`TGeoKDLoss` whose ratio network is updated.
        student_logits, teacher_logits: batch -> ``B x C`` logits (the student with ``params`` as parameters).
        params: the student's trainable parameters ``theta``.
        train_batch, meta_batch: batches with ``label``.
        optimizer: optimizer over ``loss.ratio_net`` parameters.
        eps: finite-difference step (in parameter space, along the unit direction of ``g``).

    Returns:
        ``{"meta_loss": L_meta(theta), "ratio": mean alpha, "surrogate": the minimised surrogate}``.
    """
    meta_loss = F.cross_entropy(student_logits(meta_batch).float(), meta_batch["label"])
    grads = torch.autograd.grad(meta_loss, list(params), allow_unused=True)
    g = [torch.zeros_like(p) if gr is None else gr.detach() for p, gr in zip(params, grads, strict=True)]
    norm = float(torch.sqrt(sum((x.float() ** 2).sum() for x in g)))  # type: ignore[arg-type]
    labels = train_batch["label"]
    with torch.no_grad():
        teacher = teacher_logits(train_batch).float()
        student = student_logits(train_batch).float()
        h = torch.zeros(len(labels), device=student.device)
        if norm > 0:
            saved = [p.detach().clone() for p in params]
            step = eps / norm
            _shift(params, g, step)
            plus = torch.sub(*loss.terms(student_logits(train_batch), teacher, labels))
            _shift(params, g, -2 * step)
            minus = torch.sub(*loss.terms(student_logits(train_batch), teacher, labels))
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
            h = (plus - minus) * (norm / (2 * eps))
    alpha = loss.ratio(loss.features(student, teacher, labels))
    surrogate = -(alpha * h).mean()
    optimizer.zero_grad(set_to_none=True)
    surrogate.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the student's optimizer must never see these gradients
    return {"meta_loss": float(meta_loss), "ratio": float(alpha.detach().mean()),
            "surrogate": float(surrogate.detach())}
