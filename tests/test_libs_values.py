"""Hand-computed values of LIBSFrameLoss on tiny tensors (1 channel, fixed alignment), so a wrong mask, a
reversed target, a flipped coverage sign or a moved CER boundary changes the number."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from xmodal.losses.libs import LIBSFrameLoss
from xmodal.modalities.transcript import texts_to_codepoints


def fixed_attention_loss(key_weight: float, **kwargs: object) -> LIBSFrameLoss:
    """A 1-channel LIBSFrameLoss whose attention score of audio frame ``a`` is ``key_weight * t[a]`` (no prior)."""
    loss = LIBSFrameLoss(1, 1, attn_dim=1, prior_sigma=None, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        loss.aligner.query.weight.zero_()
        loss.aligner.query.bias.fill_(1.0)
        loss.aligner.key.weight.fill_(key_weight)
        loss.aligner.key.bias.zero_()
    return loss


def frames(*rows: list[float]) -> Tensor:
    """``B x T x 1`` features from per-sample lists."""
    return torch.tensor(rows, dtype=torch.float32)[..., None]


def test_frame_loss_averages_valid_frames_against_time_aligned_targets() -> None:
    # max_offset=0 leaves each video frame only its own audio frame: targets are t, frame by frame.
    loss = fixed_attention_loss(0.0, max_offset=0.0, coverage_weight=0.0)
    mask = torch.tensor([[True, True, False]])
    s, t = frames([3.0, 0.0, 100.0]), frames([1.0, 2.0, 0.0])
    value = loss((s, mask), (t, mask), {})
    assert value.item() == pytest.approx(((3 - 1) ** 2 + (0 - 2) ** 2) / 2)  # padded third frame ignored


def test_coverage_penalty_is_added_with_its_sign() -> None:
    # scores t[a] = [0, ln 3] give every video frame weights [1/4, 3/4]: targets 3/4 ln 3; column sums [1/2, 3/2]
    # against a fair share of 1, so coverage = ((1/2 - 1)^2 + (3/2 - 1)^2) / 2 = 1/4.
    loss = fixed_attention_loss(1.0, max_offset=None, coverage_weight=2.0)
    mask = torch.ones(1, 2, dtype=torch.bool)
    s, t = frames([0.0, 0.0]), frames([0.0, math.log(3.0)])
    value = loss((s, mask), (t, mask), {})
    assert loss.last_metrics["coverage"].item() == pytest.approx(0.25)
    assert value.item() == pytest.approx((0.75 * math.log(3.0)) ** 2 + 2.0 * 0.25)


def test_cer_filter_keeps_a_sample_exactly_at_the_threshold() -> None:
    loss = fixed_attention_loss(0.0, max_offset=0.0, coverage_weight=0.0, max_cer=0.25)
    mask = torch.ones(2, 2, dtype=torch.bool)
    s, t = frames([1.0, 1.0], [3.0, 3.0]), frames([0.0, 0.0], [0.0, 0.0])
    hypotheses = texts_to_codepoints(["xbcd", "xxcd"])  # CER 0.25 and 0.5 against "abcd"
    value = loss((s, mask), (t, mask, *hypotheses), {"transcript": ["abcd", "abcd"]})
    assert value.item() == pytest.approx(1.0)  # sample 0 (cer == max_cer, error 1) kept; sample 1 (error 9) not
    assert loss.last_metrics["kept_fraction"].item() == pytest.approx(0.5)
