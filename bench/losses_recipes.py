"""The loss configurations the benchmark compares, each built from ``xmodal.losses`` classes (nothing reimplemented).

A recipe maps a :class:`Context` (which student, its feature widths, the run's length and seed) to the list of
:class:`~xmodal.contracts.DistillLoss` terms handed to the :class:`~xmodal.distiller.Distiller`, plus the Lightning
callbacks the recipe needs (TGeo-KD's meta step, mixup), whose hooks the benchmark's loop calls as Lightning would.

Weights: every KD term has weight 1 beside ``HardLabelLoss`` (cross-entropy) with weight 1, except where the loss
already contains the cross-entropy: ``TGeoKDLoss`` (``alpha * KD + (1 - alpha) * CE`` per sample) and ``OFALoss`` in
its paper formulation (target weight ``(1 + p_t[y])^gamma``; applied to the student's own logits as well as to a
branch on an intermediate feature). ``DKDLoss`` does not contain it (the paper trains with CE + DKD), so it gets one.
Hyper-parameters are each class's paper defaults unless noted in :data:`NOTES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xmodal.callbacks import AugmentBatch, TGeoKDMetaCallback
from xmodal.contracts import Batch, DistillLoss
from xmodal.losses import (
    CKALoss,
    DKDLoss,
    FeatureMSELoss,
    HardLabelLoss,
    JSDivLoss,
    KLDivLoss,
    MixupKD,
    NormDirectionLoss,
    OFALoss,
    ReverseKLLoss,
    RKDLoss,
    SinkhornLoss,
    TAIDLoss,
    TGeoKDLoss,
    TRGLoss,
)

LOGITS, FEAT, MID, TOKEN, MAP = "image.logits", "image.feat", "image.mid", "image.token", "image.map"
KD_TEMPERATURE = 4.0


@dataclass(frozen=True)
class Context:
    """What a recipe needs to know about the student and the run."""

    student: str  # "cnn" or "mlp"
    student_feat_dim: int
    student_mid_dim: int
    teacher_feat_dim: int
    teacher_map_dim: int
    student_map_dim: int | None  # None: the student has no spatial map (MLP)
    num_classes: int
    total_steps: int
    seed: int


Recipe = tuple[list[DistillLoss], list[Any]]


def ce(weight: float = 1.0) -> HardLabelLoss:
    return HardLabelLoss(LOGITS, weight=weight)


def _scratch(c: Context) -> Recipe:
    return [ce()], []


def _kd(c: Context) -> Recipe:
    return [ce(), KLDivLoss(LOGITS, LOGITS, temperature=KD_TEMPERATURE)], []


def _reverse_kl(c: Context) -> Recipe:
    return [ce(), ReverseKLLoss(LOGITS, LOGITS, temperature=KD_TEMPERATURE)], []


def _js(c: Context) -> Recipe:
    return [ce(), JSDivLoss(LOGITS, LOGITS, temperature=KD_TEMPERATURE)], []


def _dkd(c: Context) -> Recipe:
    # paper: alpha 1, beta 8, T 4, linear warm-up over the first 20 of 240 epochs (~8 %): 10 % of the steps here
    dkd = DKDLoss(LOGITS, LOGITS, alpha=1.0, beta=8.0, temperature=4.0, warmup_steps=max(1, c.total_steps // 10))
    return [ce(), dkd], []


def _taid(c: Context) -> Recipe:
    return [ce(), TAIDLoss(LOGITS, LOGITS, total_steps=c.total_steps)], []


def _sinkhorn(c: Context) -> Recipe:
    return [ce(), SinkhornLoss(LOGITS, LOGITS)], []


def _nd(c: Context) -> Recipe:
    nd = NormDirectionLoss(FEAT, FEAT, c.num_classes, c.teacher_feat_dim, student_dim=c.student_feat_dim)
    return [ce(), nd], []


def _ofa(c: Context) -> Recipe:
    kind = "map" if c.student == "cnn" else "vector"
    ofa = OFALoss([MID, LOGITS], LOGITS, c.num_classes, student_dims=[c.student_mid_dim, c.num_classes],
                  kinds=[kind, "logits"], gamma=1.0, temperature=1.0, formulation="paper")
    return [ofa], []


def _cka(c: Context) -> Recipe:
    return [ce(), CKALoss(FEAT, FEAT)], []


def _rkd(c: Context) -> Recipe:
    return [ce(), RKDLoss(FEAT, FEAT, distance_weight=1.0, angle_weight=2.0)], []


def _trg(c: Context) -> Recipe:
    if c.student_map_dim is not None:  # CNN: the 4 x 4 maps as 16 tokens per image
        trg = TRGLoss(MAP, MAP, student_dim=c.student_map_dim, teacher_dim=c.teacher_map_dim)
    else:  # MLP: one token per image (the pooled features); the contextual term is then identically 0
        trg = TRGLoss(TOKEN, TOKEN, student_dim=c.student_feat_dim, teacher_dim=c.teacher_feat_dim)
    return [ce(), trg], []


def _tgeo_kd(c: Context) -> Recipe:
    loss = TGeoKDLoss(LOGITS, LOGITS, c.num_classes, temperature=KD_TEMPERATURE)
    return [loss], [TGeoKDMetaCallback(lr=1e-3)]


def complement_lambda(batch: Batch) -> Batch:
    """Write ``mix_lambda_b = 1 - mix_lambda``, the weight of the partner's label (MixupKD writes ``mix_lambda``)."""
    batch["mix_lambda_b"] = 1.0 - batch["mix_lambda"]
    return batch


def _kd_mixup(c: Context) -> Recipe:
    # mixed cross-entropy lambda * CE(y) + (1 - lambda) * CE(y_b) as two HardLabelLoss terms with sample weights
    losses: list[DistillLoss] = [
        HardLabelLoss(LOGITS, sample_weight_key="mix_lambda"),
        HardLabelLoss(LOGITS, label_key="label_b", sample_weight_key="mix_lambda_b", name="hard_label_b"),
        KLDivLoss(LOGITS, LOGITS, temperature=KD_TEMPERATURE),
    ]
    mix = MixupKD(alpha=1.0, fraction=0.5, seed=c.seed)
    return losses, [AugmentBatch([mix, complement_lambda], mode="all")]  # type: ignore[list-item]


def _feature_mse(c: Context) -> Recipe:
    mse = FeatureMSELoss(FEAT, FEAT, student_dim=c.student_feat_dim, teacher_dim=c.teacher_feat_dim)
    return [ce(), mse], []


RECIPES: dict[str, Callable[[Context], Recipe]] = {
    "scratch": _scratch,
    "kd": _kd,
    "reverse_kl": _reverse_kl,
    "js": _js,
    "dkd": _dkd,
    "taid": _taid,
    "sinkhorn": _sinkhorn,
    "nd": _nd,
    "ofa": _ofa,
    "cka": _cka,
    "rkd": _rkd,
    "trg": _trg,
    "tgeo_kd": _tgeo_kd,
    "kd_mixup": _kd_mixup,
    "feature_mse": _feature_mse,
}

NOTES: dict[str, str] = {
    "scratch": "HardLabelLoss only, no teacher",
    "kd": "CE + KLDivLoss(T=4)",
    "reverse_kl": "CE + ReverseKLLoss(T=4)",
    "js": "CE + JSDivLoss(T=4)",
    "dkd": "CE + DKDLoss(alpha=1, beta=8, T=4, warm-up 10% of steps)",
    "taid": "CE + TAIDLoss(lambda 0.4->1, adaptive, linear floor over the run, T=1)",
    "sinkhorn": "CE + SinkhornLoss(batch, eps=0.1, 20 iters, T=2)",
    "nd": "CE + NormDirectionLoss(penultimate features, projector, running class means)",
    "ofa": "OFALoss(paper form, gamma=1, T=1) on [intermediate feature branch, own logits]; includes CE",
    "cka": "CE + CKALoss(penultimate features)",
    "rkd": "CE + RKDLoss(penultimate features, dist 1, angle 2)",
    "trg": "CE + TRGLoss(CNN: 4x4 maps as 16 tokens; MLP: pooled feature as 1 token)",
    "tgeo_kd": "TGeoKDLoss(T=4; includes CE) + TGeoKDMetaCallback(lr=1e-3)",
    "kd_mixup": "mixed CE + KLDivLoss(T=4) on MixupKD(alpha=1, fraction=0.5) batches",
    "feature_mse": "CE + FeatureMSELoss(penultimate features, linear projector)",
}

DEFAULT_LOSSES: tuple[str, ...] = tuple(RECIPES)
QUICK_LOSSES: tuple[str, ...] = ("scratch", "kd", "dkd")
