"""TargetNorm (the losses' ``normalize`` option) against hand computations, and losses invariant under it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xmodal.data.stats import TeacherStats
from xmodal.losses import (
    CKALoss,
    FeatureMSELoss,
    LIBSFrameLoss,
    LIBSSequenceLoss,
    MaskedFeatureLoss,
    RKDLoss,
    TimeAlignedMSELoss,
    UniDistillFeatureLoss,
    UniDistillRelationLoss,
)
from xmodal.losses.normalize import TargetNorm, target_norm


def write_stats(path: Path, outputs: dict[str, torch.Tensor]) -> Path:
    stats = TeacherStats()
    stats.update(outputs)
    path.write_text(json.dumps({"stats": stats.to_dict()}))
    return path


def test_none_is_the_identity() -> None:
    t = torch.randn(3, 4)
    norm = TargetNorm("none")
    assert norm.teacher(t) is t and norm.student(t) is t


def test_layernorm_by_hand() -> None:
    t = torch.tensor([[1.0, 2.0, 3.0, 6.0], [-1.0, 0.0, 0.0, 1.0]])
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    expected = (t - mean) / torch.sqrt(var + 1e-6)
    assert torch.allclose(TargetNorm("layernorm").teacher(t), expected, atol=1e-6)
    assert torch.equal(TargetNorm("layernorm").student(t), t)  # teacher side only


def test_l2_by_hand_on_both_sides() -> None:
    t = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    expected = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    norm = TargetNorm("l2")
    assert torch.allclose(norm.teacher(t), expected) and torch.allclose(norm.student(t), expected)


def test_maps_are_normalised_over_channels() -> None:
    maps = torch.randn(2, 3, 4, 5)
    assert torch.allclose(TargetNorm("l2").teacher(maps).norm(dim=1), torch.ones(2, 4, 5), atol=1e-6)


def test_standardize_with_stored_stats_is_x_minus_mean_over_std(tmp_path: Path) -> None:
    data = torch.randn(50, 6) * torch.linspace(0.5, 4, 6) + torch.arange(6.0)
    path = write_stats(tmp_path / "stats.json", {"audio.sequence": data})
    norm = target_norm(TargetNorm("standardize", stats=str(path)), "audio.sequence")
    x = torch.randn(7, 6)
    expected = (x - data.mean(0)) / data.std(0, correction=0)
    assert torch.allclose(norm.teacher(x), expected, atol=1e-5)
    assert norm.state_dict() == {}  # stored statistics come from the file, not the checkpoint


def test_stored_stats_read_a_cache_manifest_and_name_missing_keys(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    stats = TeacherStats()
    stats.update({"image.emb": torch.randn(10, 3)})
    manifest.write_text(json.dumps({"teacher_manifest": {}, "stats": stats.to_dict()}))
    assert TargetNorm("standardize", stats=str(manifest), key="image.emb").mean.shape == (3,)
    with pytest.raises(KeyError, match="text.emb"):
        TargetNorm("standardize", stats=str(manifest), key="text.emb")


def test_running_stats_converge_to_the_data_and_skip_masked_positions() -> None:
    torch.manual_seed(0)
    scale, shift = torch.tensor([0.1, 1.0, 10.0]), torch.tensor([5.0, -2.0, 0.0])
    norm = TargetNorm("standardize").train()
    for _ in range(40):
        frames = torch.randn(8, 20, 3) * scale + shift
        mask = torch.rand(8, 20) > 0.3
        frames[~mask] = 1e4  # padding must not count
        norm.teacher(frames, mask)
    mean, std = norm.statistics()
    assert torch.allclose(mean, shift, atol=0.05 * float(scale.max())) and torch.allclose(std, scale, rtol=0.05)
    assert int(norm.running_count) > 0


def test_running_cumulative_stats_equal_the_pooled_ones() -> None:
    batches = [torch.randn(5, 4) * 3 + 1, torch.randn(9, 4) - 2, torch.randn(2, 4) * 0.5]
    norm = TargetNorm("standardize").train()
    for batch in batches:
        norm.teacher(batch)
    pooled = torch.cat(batches)
    mean, std = norm.statistics()
    assert torch.allclose(mean, pooled.mean(0), atol=1e-5)
    assert torch.allclose(std, pooled.std(0, correction=0), atol=1e-5)


def test_running_ema_and_eval_mode() -> None:
    norm = TargetNorm("standardize", momentum=0.5).train()
    norm.teacher(torch.zeros(4, 2))
    norm.teacher(torch.full((4, 2), 2.0))
    assert torch.allclose(norm.statistics()[0], torch.ones(2))  # 0.5 * 0 + 0.5 * 2
    frozen = TargetNorm("standardize").eval()  # before any training batch: the batch's own statistics
    x = torch.tensor([[1.0], [3.0]])
    assert torch.allclose(frozen.teacher(x), torch.tensor([[-1.0], [1.0]]))
    assert int(frozen.running_count) == 0


def test_running_stats_round_trip_through_a_checkpoint() -> None:
    norm = TargetNorm("standardize").train()
    norm.teacher(torch.randn(16, 5) * 2 + 3)
    fresh = TargetNorm("standardize")
    fresh.load_state_dict(norm.state_dict())
    assert torch.equal(fresh.running_mean, norm.running_mean) and torch.equal(fresh.running_var, norm.running_var)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="normalize"):
        TargetNorm("whiten")  # type: ignore[arg-type]


def scaled(t: torch.Tensor) -> torch.Tensor:
    return t * 100 + torch.linspace(-50, 50, t.shape[-1])


def test_standardized_feature_loss_ignores_target_scale_and_shift(tmp_path: Path) -> None:
    torch.manual_seed(1)
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    raw = write_stats(tmp_path / "raw.json", {"f": t})
    big = write_stats(tmp_path / "big.json", {"f": scaled(t)})
    on_raw = FeatureMSELoss("f", "f", normalize=TargetNorm("standardize", stats=str(raw)))(s, t, {})
    on_big = FeatureMSELoss("f", "f", normalize=TargetNorm("standardize", stats=str(big)))(s, scaled(t), {})
    assert torch.allclose(on_raw, on_big, atol=1e-5)


@pytest.mark.parametrize("mode", ["standardize", "layernorm"])
def test_losses_with_running_or_per_vector_norm_ignore_target_scale_and_shift(mode: str) -> None:
    torch.manual_seed(2)
    per_vector = mode == "layernorm"
    seq_s, seq_t = torch.randn(5, 8), torch.randn(5, 8)
    frames_s, frames_t = torch.randn(2, 6, 8), torch.randn(2, 9, 8)
    s_mask, t_mask = torch.ones(2, 6, dtype=torch.bool), torch.tensor([[True] * 9, [True] * 7 + [False] * 2])
    shift = torch.linspace(-50, 50, 8) if not per_vector else torch.full((8,), 7.0)

    def twice(make: type, s: object, t: object, t_big: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        values = []
        for target in (t, t_big):
            torch.manual_seed(3)
            loss = make(normalize=mode, **kwargs).train()
            values.append(loss(s, target, {"transcript": ["a"] * 5}))
        return tuple(values)

    cases = [
        twice(FeatureMSELoss, seq_s, seq_t, seq_t * 100 + shift, student_key="a", teacher_key="b"),
        twice(LIBSSequenceLoss, seq_s, (seq_t,), (seq_t * 100 + shift,)),
        twice(TimeAlignedMSELoss, (frames_s, s_mask), (frames_t, t_mask), (frames_t * 100 + shift, t_mask)),
        twice(LIBSFrameLoss, (frames_s, s_mask), (frames_t, t_mask), (frames_t * 100 + shift, t_mask),
              student_dim=8, teacher_dim=8),
    ]
    for on_raw, on_big in cases:
        assert torch.allclose(on_raw, on_big, rtol=1e-4, atol=1e-5)


def test_relation_losses_take_the_option() -> None:
    torch.manual_seed(4)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    rkd = RKDLoss("s", "t", normalize="standardize").train()
    assert torch.allclose(rkd(s, t, {}), RKDLoss("s", "t", normalize="standardize").train()(s, t * 100 + 3, {}))
    cka = CKALoss(["a", "b"], ["c", "d"], normalize="layernorm")
    assert len(cka.target_norms) == 2 and torch.isfinite(cka((s, s), (t, t), {}))


def test_masked_feature_loss_true_is_l2() -> None:
    tokens, index, teacher = torch.randn(2, 3, 4), torch.tensor([[0, 2, 3], [1, 2, 4]]), torch.randn(2, 5, 4)
    flag = MaskedFeatureLoss(["t", "i"], "x", normalize=True)((tokens, index), teacher, {})
    mode = MaskedFeatureLoss(["t", "i"], "x", normalize="l2")((tokens, index), teacher, {})
    target = teacher.gather(1, index[..., None].expand(-1, -1, 4))
    assert torch.equal(flag, mode)
    assert torch.allclose(flag, F.mse_loss(F.normalize(tokens, dim=-1), F.normalize(target, dim=-1)))


def test_unidistill_feature_and_relation_losses_standardize_keypoint_channels() -> None:
    from xmodal.modalities.bev_nets import BEVGrid

    grid = BEVGrid(x_range=(-2, 2), y_range=(-2, 2), z_range=(-1, 3), cell=1.0, stride=1, classes=("car",))
    boxes = torch.zeros(1, 1, 9)
    boxes[0, 0, :7] = torch.tensor([0.0, 0.0, 0.5, 2.0, 2.0, 1.0, 0.3])
    batch = {"boxes": boxes, "box_counts": torch.tensor([1]), "box_labels": torch.zeros(1, 1, dtype=torch.long)}
    torch.manual_seed(5)
    s, t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    big = t * 100 + torch.tensor([5.0, -9.0, 30.0])[None, :, None, None]  # per channel
    for make in (UniDistillFeatureLoss, UniDistillRelationLoss):
        on_raw = make(grid, normalize="standardize").train()(s, t, batch)
        on_big = make(grid, normalize="standardize").train()(s, big, batch)
        assert torch.allclose(on_raw, on_big, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(make(grid)(s, t, batch), make(grid)(s, big, batch))
