"""The LiT teacher (locked-image tuning): frozen towers, the optional unlocked last text block, outputs, the cached
image features, the recipe's fast_dev_run on a tiny Fashion-MNIST-like corpus with tiny random towers, that its
training data holds base classes only, and the exported teacher with stored class vectors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import webdataset as wds
import yaml

from tests.test_fashion_mnist import fabricate
from xmodal.classvectors import ClassVectorsMismatchError
from xmodal.commands.main import main
from xmodal.data.corpora import fashion_mnist
from xmodal.data.decoders import decode_npy
from xmodal.data.eval_sets import write_fewshot_shards
from xmodal.data.wds import expand_shards
from xmodal.eval.base2novel import read_split
from xmodal.losses.contrastive import CLIPContrastiveLoss
from xmodal.modalities.image import ImageModality
from xmodal.modalities.imagenet_nets import ClassifierNet, file_sha256
from xmodal.students.lit import LiTCLIP
from xmodal.teachers.cached import CacheMismatchError
from xmodal.teachers.lit import LiTTeacher, store_lit_class_vectors
from xmodal.teachers.sentence import pool_tokens

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "image_teachers" / "lit_fashion_mnist.yaml"
CACHE_CONFIG = ROOT / "configs" / "image_teachers" / "cache" / "lit_fashion_mnist.yaml"
DATA = Path("runs/data/fashion-mnist")
CAPTIONS = ["a photo of a dress.", "a long warm jacket with buttons, a coat", "a grayscale photo of a trouser."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Fashion-MNIST corpus (random 28 px images, the real captions and split), 10 train samples per class."""
    idx = tmp_path_factory.mktemp("idx")
    fabricate(idx, {"train": 12, "t10k": 2})
    out = tmp_path_factory.mktemp("corpus") / "fashion-mnist"
    fashion_mnist.make(out, source=idx, n_train=100, n_val=20, n_test=20, shard_size=32, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def image_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A random ImageNet-shaped MobileNetV2 state dict (path, sha256): the tower's code, not its weights, is tested."""
    torch.manual_seed(0)
    net = ClassifierNet("mobilenet_v2").train()
    for module in net.modules():  # a random init's activations vanish: give BN statistics of some inputs
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        net.forward_parts(torch.randn(16, 3, 32, 32))
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2-random.pth"
    torch.save(net.net.state_dict(), path)
    return str(path), file_sha256(path)


def tiny_bert(tokenizer: Path, layers: int = 2) -> dict[str, Any]:
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True))
    return {"model_type": "bert", "vocab_size": vocab, "hidden_size": 16, "num_hidden_layers": layers,
            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}


def tiny_args(corpus: Path, image_weights: tuple[str, str], **overrides: Any) -> dict[str, Any]:
    args = {"image_weights": image_weights[0], "image_sha256": image_weights[1], "image_size": 32, "resize_size": 32,
            "text_model": None, "text_config": tiny_bert(corpus / "tokenizer"), "tokenizer": str(corpus / "tokenizer"),
            "embed_dim": 8}
    return {**args, **overrides}


def images(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def clip_step(model: LiTCLIP) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model({"image": images(), "caption": CAPTIONS})
    loss = CLIPContrastiveLoss()((out["image.emb"], out["text.emb"], out["logit_scale"]), None, {})
    loss.backward()
    optimizer.step()


def test_towers_are_locked_and_only_projections_and_scale_train(corpus: Path, image_weights: tuple[str, str]) -> None:
    model = LiTCLIP(**tiny_args(corpus, image_weights))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_proj.weight", "text_proj.weight", "log_logit_scale"}
    before = snapshot(model)
    clip_step(model)
    assert changed(before, model) == trainable
    assert not model.image_tower.training and not model.text_tower.training  # no BN statistics, no dropout


def test_last_text_block_trains_when_asked(corpus: Path, image_weights: tuple[str, str]) -> None:
    model = LiTCLIP(**tiny_args(corpus, image_weights, train_text_last_block=True))
    before = snapshot(model)
    clip_step(model)
    moved = changed(before, model)
    assert any(k.startswith("text_tower.encoder.encoder.layer.1.") for k in moved)
    locked = ("image_tower.", "text_tower.encoder.embeddings.", "text_tower.encoder.encoder.layer.0.")
    assert not any(k.startswith(locked) for k in moved)


def test_split_text_tower_equals_the_whole_encoder(corpus: Path, image_weights: tuple[str, str]) -> None:
    """With the last block unlocked, the memoised frozen states + the last block give the full encoder's output
    (captions of different lengths, so padding is exercised)."""
    model = LiTCLIP(**tiny_args(corpus, image_weights, train_text_last_block=True))
    tower = model.text_tower
    tokens = tower.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tower.encoder(**tokens).last_hidden_state
        expected = pool_tokens(hidden, tokens["attention_mask"], "mean")
        assert torch.allclose(tower(CAPTIONS), expected, atol=1e-5)
        assert torch.allclose(tower(CAPTIONS[::-1]), expected.flip(0), atol=1e-5)  # from the memo now


def test_memo_skips_the_encoder_and_stays_bounded(corpus: Path, image_weights: tuple[str, str]) -> None:
    model = LiTCLIP(**tiny_args(corpus, image_weights, memo_size=2))
    calls = []
    model.text_tower.encoder.register_forward_hook(lambda *_: calls.append(1))
    first = model.embed_texts(CAPTIONS[:2])
    again = model.embed_texts(CAPTIONS[:2])
    assert len(calls) == 1 and torch.equal(first, again)
    model.embed_texts(CAPTIONS[2:])
    assert list(model.text_tower.memo) == CAPTIONS[1:]


def test_outputs_are_normalised_embeddings_and_a_scale(corpus: Path, image_weights: tuple[str, str]) -> None:
    model = LiTCLIP(**tiny_args(corpus, image_weights))
    out = model({"image": images(), "caption": CAPTIONS})
    assert out["image.emb"].shape == out["text.emb"].shape == (3, 8)
    assert torch.allclose(out["image.emb"].norm(dim=-1), torch.ones(3))
    assert torch.allclose(out["text.emb"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(10.0)
    assert torch.allclose(model.embed_images(images()), out["image.emb"])


@pytest.fixture(scope="module")
def workspace(corpus: Path, image_weights: tuple[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """A folder holding the corpus, its base-class shards and the tower's caches at the paths the recipe names, and
    the recipe's overrides for the tiny towers."""
    work = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        yield work, build_workspace(corpus, image_weights, work)


def build_workspace(corpus: Path, image_weights: tuple[str, str], work: Path) -> list[str]:
    (work / DATA).parent.mkdir(parents=True)
    (work / DATA).symlink_to(corpus)
    write_fewshot_shards(str(DATA / "train-*.tar"), "runs/lit/fashion-mnist/base", read_split(DATA / "split.json"),
                         "base", shots=None)
    tower = ["--teacher.init_args.weights", image_weights[0], "--teacher.init_args.sha256", image_weights[1],
             "--teacher.init_args.image_size=32", "--teacher.init_args.resize_size=32", "--batch_size=16"]
    main(["cache", "--config", str(CACHE_CONFIG), "--shards", "runs/lit/fashion-mnist/base/train-*.tar", *tower])
    main(["cache", "--config", str(CACHE_CONFIG), "--shards", str(DATA / "val-*.tar"), "--out",
          "runs/lit/fashion-mnist/cache_val", *tower])
    args = tiny_args(corpus, image_weights)
    return [f"--model.student.init_args.{key}={v if isinstance(v := args[key], str) else json.dumps(v)}" for key in
            ("image_weights", "image_sha256", "image_size", "resize_size", "text_model", "text_config", "tokenizer",
             "embed_dim")]


def test_recipe_fast_dev_run_on_base_classes_only(workspace: tuple[Path, list[str]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe trains a step from the cached features, validates zero-shot and exports a LiTTeacher folder; every
    caption and label it trains on (the whole train set, and what the student saw) belongs to a base class."""
    work, overrides = workspace
    monkeypatch.chdir(work)
    recipe = yaml.safe_load(CONFIG.read_text())
    split = read_split(DATA / "split.json")
    base = {split.classes[i] for i in split.base}
    caption_class = {fashion_mnist.caption(label, t): fashion_mnist.CLASSES[label]
                     for label in range(10) for t in range(len(fashion_mnist.CAPTION_TEMPLATES))}
    assert len(caption_class) == 10 * len(fashion_mnist.CAPTION_TEMPLATES)  # a caption names one class
    train = list(wds.WebDataset(expand_shards(recipe["data"]["train"]), shardshuffle=False))
    assert len(train) == 50  # the 10 samples of each base class
    for sample in train:
        assert json.loads(sample["json"])["class_name"] in base
        assert caption_class[sample["txt"].decode()] in base

    seen: list[str] = []
    forward = LiTCLIP.forward
    monkeypatch.setattr(LiTCLIP, "forward", lambda self, batch: (
        seen.extend(batch["caption"]) if self.training else None, forward(self, batch))[1])
    main(["fit", "--config", str(CONFIG), "--trainer.fast_dev_run=true", "--data.batch_size=8",
          "--data.num_workers=0", *overrides])
    assert seen and {caption_class[c] for c in seen} <= base
    teacher = LiTTeacher("runs/models/lit-fashion-mnist")
    out = teacher({"image": images(2), "caption": CAPTIONS[:2]})
    assert out["image.emb"].shape == (2, 8) and out["text.emb"].shape == (2, 8)


def test_cached_features_match_the_live_tower_and_another_tower_is_refused(
    corpus: Path, image_weights: tuple[str, str], workspace: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace[0])
    manifest = "runs/lit/fashion-mnist/cache_train/manifest.json"
    model = LiTCLIP(**tiny_args(corpus, image_weights, image_cache=manifest))
    sample = next(iter(wds.WebDataset("runs/lit/fashion-mnist/cache_train/train-000000.tar", shardshuffle=False)))
    image = ImageModality(size=28).decode(sample)["image"][None]
    fields = {"teacher/" + k.removeprefix("teacher.").removesuffix(".npy"): decode_npy(v)[None]
              for k, v in sample.items() if k.startswith("teacher.") and k.endswith(".npy")}
    cached = model(fields)["image.emb"]
    live = model({"image": image})["image.emb"]
    assert torch.allclose(cached, live, atol=1e-2)  # the cache is float16
    with pytest.raises(CacheMismatchError):
        LiTCLIP(**tiny_args(corpus, image_weights, image_size=64, resize_size=64, image_cache=manifest))


def test_teacher_class_vectors_give_logits_and_must_come_from_it(corpus: Path, image_weights: tuple[str, str],
                                                                 tmp_path: Path) -> None:
    from xmodal.zoo import save_pretrained

    model = LiTCLIP(**tiny_args(corpus, image_weights))
    save_pretrained(model, model.init_args, tmp_path / "lit")
    classes = ["dress", "coat", "sandal"]
    store_lit_class_vectors(model, str(tmp_path / "vectors.safetensors"), classes)
    teacher = LiTTeacher(str(tmp_path / "lit"), class_vectors=str(tmp_path / "vectors.safetensors"))
    out = teacher({"image": images(2)})
    expected = out["logit_scale"] * model.embed_images(images(2)) @ model.embed_texts(
        [f"a photo of a {c}." for c in classes]).T
    assert torch.allclose(out["image.logits"], expected, atol=1e-5)
    other = LiTCLIP(**tiny_args(corpus, image_weights, seed=1))
    store_lit_class_vectors(other, str(tmp_path / "other.safetensors"), classes)
    with pytest.raises(ClassVectorsMismatchError):
        LiTTeacher(str(tmp_path / "lit"), class_vectors=str(tmp_path / "other.safetensors"))
