"""Evaluation: hand-computed metrics, and end-to-end runs on tiny fabricated folders and caption files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from xmodal.data.eval_sets import load_captions, scan_image_folder
from xmodal.eval.loops import evaluate_retrieval, evaluate_retrieval_json, evaluate_zeroshot, evaluate_zeroshot_folder
from xmodal.eval.metrics import RetrievalRecall, TopKAccuracy
from xmodal.eval.retrieval import recall_at_k, retrieval_metrics
from xmodal.eval.zeroshot import class_embeddings
from xmodal.modalities.text import build_word_tokenizer
from xmodal.students.clip import CLIPStudent

PALETTE = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "dark yellow": (128, 128, 0)}
NAMES = list(PALETTE)


class Oracle(nn.Module):
    """Embeds a solid-colour image and any text naming a palette colour as that colour's one-hot vector."""

    def embed_images(self, images: Tensor) -> Tensor:
        pixels = images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)
        colours = torch.tensor(list(PALETTE.values()), dtype=torch.float) / 255
        return F.one_hot(torch.cdist(pixels.mean((2, 3)), colours).argmin(1), len(PALETTE)).float()

    def embed_texts(self, texts: list[str]) -> Tensor:
        by_length = sorted(NAMES, key=len, reverse=True)  # "dark yellow" before any shorter name it contains
        idx = [NAMES.index(next(n for n in by_length if n in t.lower())) for t in texts]
        return F.one_hot(torch.tensor(idx), len(PALETTE)).float()


def tiny_student(tmp_path: Path) -> CLIPStudent:
    tok = build_word_tokenizer(
        ["a red circle", "two blue squares"] + [f"a photo of a {n}." for n in NAMES], tmp_path / "tok"
    )
    return CLIPStudent(
        embed_dim=16,
        vision_cfg={"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={
            "context_length": 16,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "pool_type": "eos",
            "eos_id": 3,
            "pad_id": 0,
        },
        tokenizer=str(tok),
    )


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def solid_batch(names: list[str], size: int = 8) -> Tensor:
    return torch.stack([torch.tensor(PALETTE[n], dtype=torch.uint8).view(3, 1, 1).expand(3, size, size) for n in names])


# --- pure metrics ------------------------------------------------------------------------------------------


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    metric = TopKAccuracy(ks)
    metric.update(logits, labels)
    return {key: value.item() for key, value in metric.compute().items()}


def test_topk_accuracy_hand_computed() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    # true-class ranks (wrong classes scoring >= the true one): 1, 0, 2; k=5 > C=3 is clipped, so always a hit
    assert topk_accuracy(logits, labels, ks=(1, 2, 5)) == pytest.approx({"top1": 1 / 3, "top2": 2 / 3, "top5": 1.0})


def test_topk_accuracy_ties_and_nan_count_against_the_model() -> None:
    assert topk_accuracy(torch.ones(4, 3), torch.tensor([0, 1, 2, 0]), ks=(1, 2, 3)) == {
        "top1": 0.0,
        "top2": 0.0,
        "top3": 1.0,
    }
    assert topk_accuracy(torch.tensor([[math.nan, 0.0]]), torch.tensor([0]), ks=(1,))["top1"] == 0.0


def test_recall_at_k_multi_gt_and_ties() -> None:
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.3],  # gt {2}: 0.9 beats it -> rank 1
            [0.2, 0.7, 0.7, 0.1],  # gt {1, 3}: best gt 0.7 ties with wrong 2 -> rank 1 (ties count against)
            [0.5, 0.4, 0.3, 0.6],  # gt {0, 3}: best gt 0.6 is the maximum -> rank 0
        ]
    )
    gt = [{2}, {1, 3}, {0, 3}]
    expected = {"R@1": 1 / 3, "R@2": 1.0, "R@10": 1.0}
    assert recall_at_k(sim, gt, ks=(1, 2, 10)) == pytest.approx(expected)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 2] = mask[1, 1] = mask[1, 3] = mask[2, 0] = mask[2, 3] = True
    assert recall_at_k(sim, mask, ks=(1, 2, 10), chunk=2) == pytest.approx(expected)
    assert recall_at_k(sim, torch.tensor([2, 1, 3]), ks=(1,)) == pytest.approx({"R@1": 1 / 3})
    with pytest.raises(ValueError, match="at least one correct"):
        recall_at_k(sim, [{2}, set(), {0}])


def test_retrieval_metrics_any_caption_counts_for_image_to_text() -> None:
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_emb = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])  # caption 0 belongs to image 0 but is nearer image 1
    metrics = retrieval_metrics(image_emb, text_emb, torch.tensor([0, 0, 1]), ks=(1, 2))
    # image 0's best caption (1) ranks first, so i2t is perfect; caption 0 misses at t2i R@1
    assert metrics == pytest.approx({"i2t_R@1": 1.0, "i2t_R@2": 1.0, "t2i_R@1": 2 / 3, "t2i_R@2": 1.0})


def test_collapsed_embeddings_are_not_perfect() -> None:
    metrics = retrieval_metrics(torch.ones(5, 4), torch.ones(5, 4), torch.arange(5), ks=(1, 5))
    assert metrics == {"i2t_R@1": 0.0, "i2t_R@5": 1.0, "t2i_R@1": 0.0, "t2i_R@5": 1.0}


# --- zero-shot ---------------------------------------------------------------------------------------------


def test_class_embeddings_are_normalised_template_means() -> None:
    emb = class_embeddings(Oracle(), ["red", "blue"], ["a photo of a {}.", "{c} art", lambda c: f"a {c} thing"])
    assert torch.allclose(emb, torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]]))


def test_evaluate_zeroshot_oracle_float_images() -> None:
    names = ["red", "blue", "dark yellow", "green"]
    loader = [
        {"image": solid_batch(names).float() / 255, "label": torch.arange(4)},
        {"image": solid_batch(["red"]), "label": torch.tensor([0])},
    ]
    assert evaluate_zeroshot(Oracle(), loader, names, ["a {}."]) == {"top1": 1.0, "top5": 1.0, "n": 5}


def make_class_folders(root: Path) -> Path:
    for name, colour in PALETTE.items():
        folder = root / name.replace(" ", "_")
        write_image(folder / "0.png", colour)
        write_image(folder / "1.jpg", colour, (30, 18))
    (root / "red" / "notes.txt").write_text("not an image")
    return root


def test_zeroshot_folder_oracle(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "imagenet")
    paths, labels, classnames = scan_image_folder(root)
    assert classnames == ["blue", "dark yellow", "green", "red"] and len(paths) == 8 and labels[:2] == [0, 0]
    metrics = evaluate_zeroshot_folder(
        Oracle(), root, ["a photo of a {}.", "art of the {}."], image_size=16, batch_size=3
    )
    assert metrics == {"top1": 1.0, "top5": 1.0, "n": 8, "classes": 4}
    shuffled = evaluate_zeroshot_folder(
        Oracle(), root, image_size=16, classnames=["red", "blue", "dark yellow", "green"]
    )
    assert shuffled["top1"] == 0.0  # names are matched to folders by sorted order, so wrong names must fail


def test_zeroshot_folder_tiny_student(tmp_path: Path) -> None:
    model = tiny_student(tmp_path)
    metrics = evaluate_zeroshot_folder(model, make_class_folders(tmp_path / "imagenet"), image_size=20, batch_size=4)
    assert set(metrics) == {"top1", "top5", "n", "classes"} and 0.0 <= metrics["top1"] <= 1.0
    assert metrics["top5"] == 1.0 and metrics["n"] == 8  # 4 classes: k=5 covers them all
    assert model.training  # mode restored


# --- retrieval ---------------------------------------------------------------------------------------------


def test_evaluate_retrieval_shards_oracle_and_student(tmp_path: Path) -> None:
    names = ["red", "green", "blue", "dark yellow"]
    loader = [
        {"image": solid_batch(names[:3]), "caption": ["a red circle", "green", "two blue squares"]},
        {"image": solid_batch(names[3:]), "caption": ["dark yellow"]},
    ]
    metrics = evaluate_retrieval(Oracle(), loader)
    assert metrics == {**{f"{d}_R@{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}, "n_images": 4, "n_texts": 4}
    student = evaluate_retrieval(tiny_student(tmp_path), loader, device="cpu")
    assert all(0.0 <= student[f"{d}_R@1"] <= 1.0 for d in ("i2t", "t2i")) and student["i2t_R@5"] == 1.0


def make_caption_images(root: Path) -> None:
    for name in ("red", "green", "blue"):
        write_image(root / "val" / f"{name}.png", PALETTE[name])
    write_image(root / "train" / "yellow.png", PALETTE["dark yellow"])


def test_karpathy_json_oracle(tmp_path: Path) -> None:
    make_caption_images(tmp_path / "images")
    images = [
        {
            "filename": f"{n}.png",
            "filepath": "val",
            "split": "test",
            "sentences": [{"raw": f"A {n} square. "}, {"raw": f"{n}!"}],
        }
        for n in ("red", "green", "blue")
    ]
    images.append(
        {"filename": "yellow.png", "filepath": "train", "split": "train", "sentences": [{"raw": "dark yellow"}]}
    )
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    assert load_captions(path, "test")[0] == ("val/red.png", ["A red square.", "red!"])
    perfect = {f"{d}_R@{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    test = evaluate_retrieval_json(Oracle(), path, tmp_path / "images", image_size=16, batch_size=2, split="test")
    assert test == {**perfect, "n_images": 3, "n_texts": 6}
    everything = evaluate_retrieval_json(Oracle(), path, tmp_path / "images", image_size=16)
    assert everything == {**perfect, "n_images": 4, "n_texts": 7}


def test_coco_json_oracle_with_a_misleading_caption(tmp_path: Path) -> None:
    make_caption_images(tmp_path / "images")
    data = {
        "images": [
            {"id": 7, "file_name": "val/red.png"},
            {"id": 3, "file_name": "val/green.png"},
            {"id": 5, "file_name": "val/blue.png"},
            {"id": 9, "file_name": "val/uncaptioned.png"},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "a red square"},
            {"id": 2, "image_id": 3, "caption": "a green square"},
            {"id": 3, "image_id": 3, "caption": "a blue thing, wrongly"},  # belongs to green, names blue
            {"id": 4, "image_id": 5, "caption": "a blue square"},
            {"id": 5, "image_id": 5, "caption": "blue again"},
        ],
    }
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no 'split' field"):
        load_captions(path, "test")
    metrics = evaluate_retrieval_json(Oracle(), path, tmp_path / "images", image_size=16)
    # i2t: blue's best caption (sim 1) ties with green's misleading caption -> miss at 1; red and green hit.
    # t2i: the misleading caption sees blue (1) and red (0, tied with its own green) above green -> rank 2.
    assert metrics == pytest.approx(
        {
            "i2t_R@1": 2 / 3,
            "i2t_R@5": 1.0,
            "i2t_R@10": 1.0,
            "t2i_R@1": 4 / 5,
            "t2i_R@5": 1.0,
            "t2i_R@10": 1.0,
            "n_images": 3,
            "n_texts": 5,
        }
    )


def test_caption_json_tiny_student(tmp_path: Path) -> None:
    make_caption_images(tmp_path / "images")
    images = [
        {"filename": f"{n}.png", "filepath": "val", "split": "test", "sentences": [{"raw": f"a {n} circle"}] * 2}
        for n in ("red", "green", "blue")
    ]
    path = tmp_path / "karpathy.json"
    path.write_text(json.dumps({"images": images}))
    metrics = evaluate_retrieval_json(tiny_student(tmp_path), path, tmp_path / "images", image_size=16, split="test")
    assert metrics["n_images"] == 3 and metrics["n_texts"] == 6
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if "R@" in k) and metrics["t2i_R@5"] == 1.0


def test_same_text_retrieval_counts_identical_captions() -> None:
    # images 0 and 1 share the caption "a"; image 2 has "b". Text embeddings equal for equal strings.
    image = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    strict = retrieval_metrics(image, text, torch.arange(3), ks=(1,))
    metric = RetrievalRecall(ks=(1,))
    metric.update(image, text, captions=["a", "a", "b"])
    loose = metric.compute()
    # strict: caption 1 ("a") ranks image 0 first, which is not its own image -> t2i R@1 = 2/3
    assert strict["t2i_R@1"] == pytest.approx(2 / 3)
    assert loose["t2i_R@1"] == pytest.approx(1.0) and loose["i2t_R@1"] == pytest.approx(1.0)
