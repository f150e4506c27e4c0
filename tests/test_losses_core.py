"""The foundation's losses against values worked out by hand."""

import math

import pytest
import torch

from xmodal.losses import CLIPContrastiveLoss, FeatureCosineLoss, FeatureMSELoss, KLDivLoss


def test_kl_matches_hand_computation() -> None:
    s = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    t = torch.tensor([[0.0, 0.0]])  # softmax = [1/2, 1/2]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    loss = KLDivLoss("a.logits", "a.logits")(s, t, {})
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_kl_temperature_scales_logits_and_multiplies_by_t_squared() -> None:
    s = torch.tensor([[0.0, 2 * math.log(3.0)]])  # /T=2 -> [1/4, 3/4]
    t = torch.tensor([[0.0, 0.0]])
    expected = 4 * (0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0))
    loss = KLDivLoss("a.logits", "a.logits", temperature=2.0)(s, t, {})
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_kl_is_zero_for_identical_logits() -> None:
    z = torch.randn(4, 7)
    assert KLDivLoss("k", "k", temperature=3.0)(z, z.clone(), {}).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_mse_by_hand() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [3.0, 2.0]])
    # squared errors 1, 0, 0, 4 -> mean 5/4
    assert FeatureMSELoss("f", "f")(s, t, {}).item() == pytest.approx(1.25)


def test_feature_cosine_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    # cosines 0 and 1 -> mean(1 - cos) = 0.5
    assert FeatureCosineLoss("f", "f")(s, t, {}).item() == pytest.approx(0.5)


def test_feature_loss_projects_when_widths_differ_and_explains_mismatch() -> None:
    loss = FeatureMSELoss("f", "f", student_dim=3, teacher_dim=5)
    out = loss(torch.randn(2, 3), torch.randn(2, 5), {})
    out.backward()
    assert loss.projector.weight.grad is not None
    with pytest.raises(ValueError, match="student_dim and teacher_dim"):
        FeatureMSELoss("f", "f")(torch.randn(2, 3), torch.randn(2, 5), {})


def test_clip_contrastive_by_hand() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    scale = torch.tensor(2.0)
    # logits = 2 * I T^T = [[2, 2c], [0, 2c]] with c = sqrt(.5)
    c = math.sqrt(0.5)
    lse = lambda a, b: math.log(math.exp(a) + math.exp(b))  # noqa: E731
    rows = (lse(2, 2 * c) - 2) + (lse(0, 2 * c) - 2 * c)
    cols = (lse(2, 0) - 2) + (lse(2 * c, 2 * c) - 2 * c)
    expected = (rows / 2 + cols / 2) / 2
    loss = CLIPContrastiveLoss()((image, text, scale), None, {})
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_loss_names_default_and_select_reports_missing_keys() -> None:
    loss = KLDivLoss("audio.logits", "audio.logits")
    assert loss.name == "kl"
    assert FeatureMSELoss("x", "x").name == "feature_mse"
    assert FeatureCosineLoss("x", "x", name="img_cos").name == "img_cos"
    with pytest.raises(KeyError, match="audio.logits"):
        loss.select({"video.logits": torch.zeros(1)}, {"audio.logits": torch.zeros(1)})


def test_resample_to_by_hand() -> None:
    from xmodal.modalities.audio import resample_to

    # 4 source steps [0, 1, 2, 3] -> 2 target steps sample at positions 0.5 and 2.5
    source = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])
    out = resample_to(source, torch.tensor([4]), torch.tensor([2]), target_steps=3)
    assert out[0, :2, 0].tolist() == pytest.approx([0.5, 2.5])
    # only the first 2 source steps are valid -> upsampled to 4 target steps: positions -0.25..1.25 clamped
    out = resample_to(source, torch.tensor([2]), torch.tensor([4]), target_steps=4)
    assert out[0, :, 0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])


def test_time_aligned_mse_by_hand_ignores_padding() -> None:
    from xmodal.losses import TimeAlignedMSELoss

    teacher = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])  # resampled to 2 steps: 0.5, 2.5
    t_mask = torch.tensor([[True, True, True, True]])
    student = torch.tensor([[[1.5], [2.5], [100.0]]])  # third step is padding
    s_mask = torch.tensor([[True, True, False]])
    loss = TimeAlignedMSELoss()((student, s_mask), (teacher, t_mask), {})
    assert loss.item() == pytest.approx((1.0**2 + 0.0**2) / 2)


def test_affinity_mimic_by_hand() -> None:
    from xmodal.losses import AffinityMimicLoss

    image_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # student logits (scale 1): [[1, 1], [0, 0]] -> rows uniform; columns: softmax([1, 0]) for both columns
    image_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # teacher logits (scale 2): [[2, 0], [0, 2]]
    p = math.exp(2) / (math.exp(2) + 1)  # teacher's probability on the diagonal
    q = math.exp(1) / (math.exp(1) + 1)  # student's column softmax on image 0
    rows = -(p * math.log(0.5) + (1 - p) * math.log(0.5))  # each row: teacher [p, 1-p] vs student [.5, .5]
    col0 = -(p * math.log(q) + (1 - p) * math.log(1 - q))  # column 0: teacher [p, 1-p] vs student [q, 1-q]
    col1 = -((1 - p) * math.log(q) + p * math.log(1 - q))  # column 1: teacher [1-p, p] vs student [q, 1-q]
    expected = (rows + (col0 + col1) / 2) / 2
    loss = AffinityMimicLoss()((image_s, text_s, torch.tensor(1.0)), (image_t, text_t, torch.tensor(2.0)), {})
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    same = (image_t, text_t)
    fixed = AffinityMimicLoss(temperature=0.5)((*same, torch.tensor(9.0)), (*same, torch.tensor(1.0)), {})
    assert fixed.item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), abs=1e-6)


def test_affinity_mimic_sends_no_gradient_into_the_teacher() -> None:
    from xmodal.losses import AffinityMimicLoss

    student = [torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    teacher = [torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    t_scale = torch.tensor(2.0, requires_grad=True)
    AffinityMimicLoss()((*student, torch.tensor(1.0)), (*teacher, t_scale), {}).backward()
    assert all(x.grad is None for x in (*teacher, t_scale))
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in student)
