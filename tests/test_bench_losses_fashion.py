"""The loss benchmark on Fashion-MNIST with a pretrained-architecture teacher (bench/losses.py ``--dataset
fashion-mnist --teacher DIR``): the corpus's split and low-label subsets, the precomputed teacher, and a quick run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of scripts at the repository root, not part of the package
    sys.path.insert(0, str(ROOT))

from bench.losses import BenchConfig, run_benchmark  # noqa: E402
from bench.losses_data import PrecomputedTeacher, load_fashion_mnist  # noqa: E402
from tests.test_fashion_mnist import fabricate  # noqa: E402
from xmodal.data.corpora import fashion_mnist  # noqa: E402
from xmodal.data.decoders import UNLABELLED  # noqa: E402
from xmodal.students.imagenet import ImageNetClassifier  # noqa: E402
from xmodal.teachers.imagenet import ImageNetTeacher  # noqa: E402

TRAIN = 300


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fashion-source")
    fabricate(folder, {"train": 500 + TRAIN // 10, "t10k": 6})  # 5,000 go to val, as in the corpus
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    student = ImageNetClassifier("mobilenet_v2", num_classes=10, pretrained=False, image_size=32, resize_size=32)
    out = tmp_path_factory.mktemp("teacher")
    student.export(out)
    return out


def test_split_and_labels_match_the_corpus(source: Path, tmp_path: Path) -> None:
    fashion_mnist.make(tmp_path, source=source, shard_size=1000, workers=1, progress=False)
    data = load_fashion_mnist(None, 10, source_dir=source)
    assert len(data.train) == TRAIN and len(data.test) == 60
    labelled = {int(k.rsplit("-", 1)[-1]) for k in fashion_mnist.labelled_keys(tmp_path, 10)}
    kept = {i for i, label in enumerate(data.train.labels.tolist()) if label != UNLABELLED}
    assert kept == labelled and 0 < len(kept) < TRAIN
    full = load_fashion_mnist(None, None, source_dir=source)
    assert torch.equal(full.train.images, data.train.images) and (full.train.labels >= 0).all()
    assert torch.equal(full.train.labels[sorted(kept)], data.train.labels[sorted(kept)])


def test_precomputed_teacher_serves_the_live_outputs(source: Path, teacher_dir: Path) -> None:
    data = load_fashion_mnist(40, None, source_dir=source)
    live = ImageNetTeacher(weights=str(teacher_dir), feature_map=True).eval()
    served = PrecomputedTeacher(live, data.train, batch_size=16)
    batch = data.train.batch(torch.tensor([3, 17, 0]))
    with torch.no_grad():
        expected = live(batch)
    out = served(batch)
    assert set(out) == {"image.feat", "image.logits", "image.map", "image.token"}
    torch.testing.assert_close(out["image.logits"], expected["image.logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["image.map"], expected["image.feature_map"], rtol=1e-4, atol=1e-5)
    mixed = {**batch, "image": batch["image"].flip(0), "mix_lambda": torch.tensor([0.5, 1.0, 1.0])}
    with torch.no_grad():
        torch.testing.assert_close(served(mixed)["image.logits"], live(mixed)["image.logits"])


def test_quick_run_with_the_pretrained_teacher(source: Path, teacher_dir: Path) -> None:
    cfg = BenchConfig.quick(dataset="fashion-mnist", source=str(source), teacher=str(teacher_dir), subset=200,
                            labelled_percent=10, losses=("scratch", "kd", "kd_mixup", "trg"), epochs=1)
    result = run_benchmark(cfg, log=False)
    assert result["data"]["name"] == "fashion-mnist-10pct" and result["data"]["train"] == 200
    assert result["teacher"]["weights"] == str(teacher_dir)
    assert {row["status"] for row in result["runs"]} == {"ok"}, [r.get("error") for r in result["runs"]]
    assert all(0 <= row["test_acc"] <= 1 for row in result["runs"])
