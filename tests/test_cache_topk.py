"""Top-k caching of large-vocabulary logits, and the teacher running under inference mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from xmodal.data.cache import cache_teacher
from xmodal.data.wds import make_pipeline, prepare_on_device
from xmodal.distiller import Distiller
from xmodal.losses import KLDivLoss
from xmodal.modalities.image import ImageModality
from xmodal.teachers.cached import CachedTeacher, dense_from_top_k

VOCAB = 40


class LogitTeacher(nn.Module):
    """A frozen linear classifier over 16 px images: logits over ``VOCAB`` entries."""

    output_keys = ("image.logits",)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3 * 16 * 16, VOCAB)
        self.saw_inference_mode: list[bool] = []

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.saw_inference_mode.append(torch.is_inference_mode_enabled())
        return {"image.logits": 3 * self.head(batch["image"].flatten(1))}

    def manifest(self) -> dict[str, Any]:
        return {"name": "logit-teacher", "output_keys": list(self.output_keys)}


class LogitStudent(nn.Module):
    output_keys = ("image.logits",)

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 16 * 16, VOCAB)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"image.logits": self.head(batch["image"].flatten(1))}


def first_batch(shards: str, modality: ImageModality) -> dict[str, Any]:
    batch = next(iter(make_pipeline(shards, [modality], batch_size=8, train=False)))
    return prepare_on_device(batch, [modality], train=False)


def test_dense_from_top_k_is_normalised_and_exact_on_the_top_k() -> None:
    log_probs = torch.randn(2, 3, 10).mul(3).log_softmax(-1)
    values, indices = log_probs.topk(4, dim=-1)
    dense = dense_from_top_k(values, indices, 10)
    assert torch.allclose(dense.exp().sum(-1), torch.ones(2, 3), atol=1e-6)
    assert torch.equal(dense.gather(-1, indices), values)
    rest = torch.ones_like(dense, dtype=torch.bool).scatter_(-1, indices, False)
    outside = 1 - values.exp().sum(-1)  # spread evenly over the 6 others
    assert torch.allclose(dense.exp()[rest].view(2, 3, 6), (outside / 6).unsqueeze(-1).expand(2, 3, 6), atol=1e-6)
    full_values, full_indices = log_probs.topk(10, dim=-1)
    assert torch.allclose(dense_from_top_k(full_values, full_indices, 10), log_probs, atol=1e-6)


@pytest.mark.parametrize("k", [5, VOCAB])
def test_top_k_cache_serves_the_teachers_top_k_log_probabilities(shapes_dir: Path, tmp_path: Path, k: int) -> None:
    modality, teacher = ImageModality(size=16), LogitTeacher()
    manifest = cache_teacher(teacher, [modality], str(shapes_dir / "train-*.tar"), tmp_path / "cache",
                             batch_size=16, top_k={"image.logits": k})
    assert manifest["top_k"] == {"image.logits": {"k": k, "size": VOCAB}}
    batch = first_batch(str(tmp_path / "cache" / "train-*.tar"), modality)
    assert batch["teacher/image.logits.topi"].shape == (8, k)
    served = CachedTeacher(str(tmp_path / "cache"), teacher)(batch)["image.logits"]
    with torch.no_grad():
        live = teacher(batch)["image.logits"].log_softmax(-1)
    values, indices = live.topk(k, dim=-1)
    assert torch.allclose(served.gather(-1, indices), values, atol=2e-2)  # stored in float16
    assert torch.allclose(served.exp().sum(-1), torch.ones(8), atol=1e-2)
    kl = torch.nn.functional.kl_div(served.log_softmax(-1), live, log_target=True, reduction="batchmean")
    assert kl < (1e-3 if k == VOCAB else 0.5)


def test_top_k_of_an_unknown_output_is_refused(shapes_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image.logit"):
        cache_teacher(LogitTeacher(), [ImageModality(size=16)], str(shapes_dir / "train-*.tar"), tmp_path / "c",
                      top_k={"image.logit": 5})


def test_the_teacher_runs_in_inference_mode_and_the_student_still_trains(shapes_dir: Path) -> None:
    modality, teacher = ImageModality(size=16), LogitTeacher()
    kd = KLDivLoss("image.logits", "image.logits", temperature=2.0)
    model = Distiller(student=LogitStudent(), teacher=teacher, losses=[kd])
    batch = first_batch(str(shapes_dir / "train-*.tar"), modality)
    total, _ = model.compute_losses(batch)
    total.backward()
    assert teacher.saw_inference_mode == [True]
    outputs = model.teacher_outputs(batch)
    assert outputs is not None and not outputs["image.logits"].is_inference()
    assert model.student.head.weight.grad is not None and model.student.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_shards_of_one_cache_are_refused_with_another_caches_manifest(shapes_dir: Path, tmp_path: Path) -> None:
    from xmodal.teachers.cached import CacheMismatchError

    modality, teacher = ImageModality(size=16), LogitTeacher()
    first = cache_teacher(teacher, [modality], str(shapes_dir / "train-*.tar"), tmp_path / "a", batch_size=16)
    second = cache_teacher(teacher, [modality], str(shapes_dir / "train-*.tar"), tmp_path / "b", batch_size=16)
    assert first["cache_id"] != second["cache_id"]  # the same teacher cached twice: two caches all the same
    batch = first_batch(str(tmp_path / "a" / "train-*.tar"), modality)
    assert batch["teacher/cache_id"] == [first["cache_id"]] * 8
    assert "image.logits" in CachedTeacher(str(tmp_path / "a"), teacher)(batch)
    with pytest.raises(CacheMismatchError, match=rf"cache {first['cache_id']}.*b/manifest.json describes"):
        CachedTeacher(str(tmp_path / "b"), teacher)(batch)


def test_a_cache_of_another_split_is_accepted_through_split_manifests(shapes_dir: Path, tmp_path: Path) -> None:
    from xmodal.teachers.cached import CacheMismatchError

    modality, teacher = ImageModality(size=16), LogitTeacher()
    train = cache_teacher(teacher, [modality], str(shapes_dir / "train-*.tar"), tmp_path / "train", batch_size=16)
    val = cache_teacher(teacher, [modality], str(shapes_dir / "val-*.tar"), tmp_path / "val", batch_size=16,
                        prefix="val")
    batch = first_batch(str(tmp_path / "val" / "val-*.tar"), modality)
    assert train["cache_id"] != val["cache_id"]
    with pytest.raises(CacheMismatchError, match="split_manifests"):
        CachedTeacher(str(tmp_path / "train"), teacher)(batch)
    both = CachedTeacher(str(tmp_path / "train"), teacher, split_manifests=[str(tmp_path / "val")])
    alone = CachedTeacher(str(tmp_path / "val"), teacher)
    assert torch.equal(both(batch)["image.logits"], alone(batch)["image.logits"])
    other = json.loads((tmp_path / "val" / "manifest.json").read_text())
    other["teacher_manifest"]["weights_sha256"] = "0" * 64  # a cache of another teacher
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(CacheMismatchError, match="weights_sha256"):
        CachedTeacher(str(tmp_path / "train"), teacher, split_manifests=[str(tmp_path / "other.json")])
