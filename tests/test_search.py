"""DisWOT student search: the metric by hand, ranking, determinism and the console verb."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from xmodal.commands.search import search_main
from xmodal.data.shards import write_shards
from xmodal.search import diswot_score, probe, rank_students, relation_matrix, semantic_matrix

VIT = "torchvision.models.VisionTransformer"


class Net(nn.Module):
    """conv features -> pooled ``B x width`` -> linear classifier."""

    def __init__(self, width: int, classes: int = 4, depth: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def test_semantic_and_relation_matrices_by_hand() -> None:
    logits = torch.zeros(2, 2)  # softmax = [.5, .5]
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    # E = softmax - onehot = [[-.5, .5], [.5, -.5]];  A = E^T F / 2 = [[-.25, .5], [.25, -.5]]
    a = torch.tensor([[-0.25, 0.5], [0.25, -0.5]])
    gram = a @ a.t()
    expected = gram / gram.norm(dim=1, keepdim=True)
    assert torch.allclose(semantic_matrix(logits, features, labels), expected)
    assert torch.allclose(relation_matrix(features), torch.eye(2))  # orthogonal samples


def test_probe_finds_the_classifier_and_its_input() -> None:
    torch.manual_seed(0)
    net, x = Net(5), torch.rand(3, 3, 8, 8)
    logits, features, relation = probe(net, x)
    assert torch.allclose(features, net.features(x)) and torch.allclose(logits, net(x))
    _, _, relation = probe(net, x, relation_module="features.0")
    assert relation.shape == (3, 5 * 8 * 8)


def test_teacher_clone_ranks_first_and_scores_are_deterministic() -> None:
    torch.manual_seed(0)
    teacher = Net(16, depth=2)
    images, labels = torch.rand(8, 3, 8, 8), torch.arange(8) % 4
    candidates = {"narrow": Net(4), "clone": copy.deepcopy(teacher), "deep": Net(8, depth=3)}
    ranking = rank_students(teacher, candidates, (images, labels))
    assert ranking[0] == ("clone", 0.0)
    assert all(score < 0 for _, score in ranking[1:])
    again = rank_students(teacher, candidates, [(images, labels)])
    assert ranking == again
    direct = diswot_score(teacher, candidates["narrow"], images, labels)
    assert dict(ranking)["narrow"] == direct
    assert diswot_score(teacher, candidates["narrow"], {"image": images, "label": labels}, labels) == direct
    assert candidates["clone"].training  # modes are restored after probing


def test_score_without_labels_uses_teacher_predictions() -> None:
    torch.manual_seed(1)
    teacher, student, images = Net(8), Net(4), torch.rand(6, 3, 8, 8)
    pseudo = teacher(images).argmax(-1)
    assert diswot_score(teacher, student, images) == diswot_score(teacher, student, images, pseudo)
    with pytest.raises(ValueError, match="student logits"):
        diswot_score(teacher, Net(4, classes=3), images)


def vit(layers: int, width: int) -> dict[str, Any]:
    return {"class_path": VIT, "init_args": {"image_size": 16, "patch_size": 8, "num_layers": layers,
                                             "num_heads": 2, "hidden_dim": width, "mlp_dim": 2 * width,
                                             "num_classes": 3}}


def png_bytes() -> bytes:
    """A random 16 x 16 RGB image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def test_search_student_console_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    samples = [{"__key__": f"{i:04d}", "png": png_bytes(), "json": {"label": i % 3}} for i in range(12)]
    write_shards(samples, tmp_path / "data", "train", max_count=6)
    torch.manual_seed(7)
    from torchvision.models import VisionTransformer

    teacher = VisionTransformer(**vit(2, 32)["init_args"])
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    clone = {**vit(2, 32), "name": "teacher-clone", "checkpoint": "teacher.pt"}
    config = {"teacher": {**vit(2, 32), "checkpoint": "teacher.pt"},
              "candidates": [{**vit(1, 16), "name": "small"}, clone, {**vit(1, 32), "name": "shallow"}]}
    (tmp_path / "cands.yaml").write_text(yaml.safe_dump(config))
    argv = ["--candidates", str(tmp_path / "cands.yaml"), "--data", str(tmp_path / "data" / "train-*.tar"),
            "--image-size", "16", "--batch-size", "8", "--num-batches", "2", "--device", "cpu",
            "--out", str(tmp_path / "ranking.json")]
    rows = search_main(argv)
    assert [r["name"] for r in rows][0] == "teacher-clone" and rows[0]["score"] == 0.0
    assert json.loads((tmp_path / "ranking.json").read_text()) == rows
    assert "| 1 | teacher-clone |" in capsys.readouterr().out
    assert search_main(argv) == rows  # candidates are built under a fixed seed: same ranking every run
    assert all(r["score"] < 0 for r in rows[1:])


def test_candidates_may_name_plugins_by_short_class_name(tmp_path: Path) -> None:
    samples = [{"__key__": f"{i:04d}", "png": png_bytes(), "json": {"label": i % 3}} for i in range(8)]
    write_shards(samples, tmp_path / "data", "train", max_count=8)
    classifier = {"class_path": "ImageNetClassifier",  # an xmodal plug-in, known after load_plugins()
                  "init_args": {"arch": "resnet18", "num_classes": 3, "pretrained": False, "image_size": 16,
                                "resize_size": 16}}
    config = {"teacher": vit(1, 16), "candidates": [{**classifier, "name": "resnet"}, {**vit(1, 16), "name": "vit"}]}
    (tmp_path / "cands.yaml").write_text(yaml.safe_dump(config))
    rows = search_main(["--candidates", str(tmp_path / "cands.yaml"), "--data", str(tmp_path / "data" / "train-*.tar"),
                        "--image-size", "16", "--batch-size", "8", "--device", "cpu"])
    assert sorted(r["name"] for r in rows) == ["resnet", "vit"]
