"""Hugging Face round trip: every student kind through save_pretrained -> from_pretrained with the same outputs,
push_to_hub against a recording HfApi (no network), and ExportStudent's folder: a card with the run's facts and
metrics, loadable by open_clip."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub.hub_mixin
import lightning as L
import open_clip
import pytest
import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from tests.conftest import tiny_clip_args
from xmodal.callbacks import ExportStudent
from xmodal.data.wds import WdsDataModule
from xmodal.distiller import Distiller
from xmodal.losses import CLIPContrastiveLoss
from xmodal.losses.features import FeatureCosineLoss
from xmodal.modalities.image import ImageModality
from xmodal.modalities.prompts import PromptedCLIP
from xmodal.modalities.text import TextModality
from xmodal.students.av import VideoStudent
from xmodal.students.clip import CLIPStudent, save_open_clip_dir
from xmodal.students.lipreader import LipReader
from xmodal.students.prompted import PromptedImageStudent
from xmodal.teachers.open_clip import OpenCLIPTeacher
from xmodal.teachers.prompted import store_class_vectors

CAPTIONS = ["a red circle", "a blue square"]
CLASSES = ["circle", "square", "triangle"]
Builder = Callable[[Path, Path], tuple[Any, dict[str, Any]]]


def images(n: int = 2) -> Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def clip_student(tokenizer: Path, work: Path) -> tuple[Any, dict[str, Any]]:
    return CLIPStudent(**tiny_clip_args(tokenizer)), {"image": images(), "caption": CAPTIONS}


def video_student(tokenizer: Path, work: Path) -> tuple[Any, dict[str, Any]]:
    video = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    student = VideoStudent(out_dim=8, dim=16, depth=1, heads=2, channels=4, dropout=0.0)
    return student, {"video": video, "video_lengths": torch.tensor([4, 3])}


def lip_reader(tokenizer: Path, work: Path) -> tuple[Any, dict[str, Any]]:
    from tests.test_lipreading import TINY, make_batch

    return LipReader(**TINY), make_batch()


def prompted_clip(tokenizer: Path, work: Path) -> tuple[Any, dict[str, Any]]:
    clip_dir = save_open_clip_dir(CLIPStudent(**tiny_clip_args(tokenizer)), work / "clip")
    prompted = PromptedCLIP(str(clip_dir), CLASSES, n_ctx=2, vision_n_ctx=2, init_std=0.5)
    return prompted, {"image": images()}


def prompted_image_student(tokenizer: Path, work: Path) -> tuple[Any, dict[str, Any]]:
    teacher, _ = prompted_clip(tokenizer, work)
    vectors = store_class_vectors(teacher, work / "class_vectors.safetensors")
    return PromptedImageStudent(str(work / "clip"), str(vectors), n_ctx=2), {"image": images()}


def bev_detector(tokenizer: Path, work: Path) -> tuple[Any, dict[str, Any]]:
    from tests.test_bev_models import SCENES, TINY, synthetic_batch
    from xmodal.modalities.bev_detector import BEVDetector

    return BEVDetector("fusion", **TINY), synthetic_batch(SCENES)


def same_outputs(a: nn.Module, b: nn.Module, batch: dict[str, Any]) -> None:
    with torch.no_grad():
        got, want = a.eval()(batch), b.eval()(batch)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("build", [clip_student, video_student, lip_reader, prompted_clip, prompted_image_student,
                                   bev_detector], ids=lambda f: f.__name__)
def test_save_pretrained_then_from_pretrained_gives_the_same_outputs(build: Builder, shapes_dir: Path,
                                                                      tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, batch = build(shapes_dir / "tokenizer", tmp_path)
    model.save_pretrained(tmp_path / "saved", model_card_kwargs={"metrics": {"val/top1": 0.375}})
    shutil.rmtree(tmp_path / "clip", ignore_errors=True)  # a folder an init arg named is bundled, not referenced
    assert {"model.safetensors", "config.json", "card.yaml", "README.md"} <= {p.name for p in
                                                                             (tmp_path / "saved").iterdir()}

    loaded = type(model).from_pretrained(tmp_path / "saved")
    assert type(loaded) is type(model) and not loaded.training
    same_outputs(loaded, model, batch)
    assert "| val/top1 | 0.375 |" in (tmp_path / "saved" / "README.md").read_text()


def test_from_pretrained_refuses_another_class(shapes_dir: Path, tmp_path: Path) -> None:
    model, _ = video_student(shapes_dir / "tokenizer", tmp_path)
    model.save_pretrained(tmp_path / "video")
    with pytest.raises(TypeError, match="holds a VideoStudent, not a CLIPStudent"):
        CLIPStudent.from_pretrained(tmp_path / "video")


def test_unknown_card_fields_are_refused(shapes_dir: Path, tmp_path: Path) -> None:
    model, _ = video_student(shapes_dir / "tokenizer", tmp_path)
    with pytest.raises(TypeError, match="unknown model card fields"):
        model.save_pretrained(tmp_path / "video", model_card_kwargs={"acuracy": 1.0})


class RecordingHfApi:
    """Stands in for huggingface_hub's HfApi: records create_repo and keeps a copy of each uploaded folder."""

    calls: list[tuple[str, dict[str, Any]]] = []
    uploads: Path

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, **kwargs: Any) -> str:
        self.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        shutil.copytree(folder_path, self.uploads / repo_id)
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_push_to_hub_uploads_the_saved_folder(shapes_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", RecordingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    monkeypatch.setattr(RecordingHfApi, "uploads", tmp_path / "hub", raising=False)
    torch.manual_seed(0)
    model, batch = clip_student(shapes_dir / "tokenizer", tmp_path)
    url = model.push_to_hub("someone/tiny-clip", private=True, token="hf_fake",
                            model_card_kwargs={"license": "apache-2.0"})

    assert url == "https://huggingface.co/someone/tiny-clip/commit/0"
    assert [name for name, _ in RecordingHfApi.calls] == ["create_repo", "upload_folder"]
    assert RecordingHfApi.calls[0][1]["private"] is True
    uploaded = tmp_path / "hub" / "someone" / "tiny-clip"
    assert {p.name for p in uploaded.iterdir()} == {"model.safetensors", "config.json", "card.yaml", "README.md",
                                                    "tokenizer", "open_clip_config.json", "open_clip_model.safetensors",
                                                    "tokenizer.json", "tokenizer_config.json"}
    assert "license: apache-2.0" in (uploaded / "README.md").read_text()
    same_outputs(CLIPStudent.from_pretrained(uploaded), model, batch)
    pixels = model.normalize(images())
    with torch.no_grad():  # a CLIP student's pushed folder is an open_clip folder too
        assert torch.equal(open_clip.create_model(f"local-dir:{uploaded}").eval().encode_image(pixels),
                           model.encode_image(pixels))


def test_export_student_writes_the_runs_facts_and_an_open_clip_folder(shapes_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    L.seed_everything(0)
    save_open_clip_dir(CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer")), "teacher")
    teacher = OpenCLIPTeacher("local-dir:teacher")  # a relative path, as the demo recipes write it
    losses = [CLIPContrastiveLoss(), FeatureCosineLoss("image.emb", "image.emb")]
    model = Distiller(CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer")), losses, teacher=teacher)
    data = WdsDataModule([ImageModality(16), TextModality()], train=str(shapes_dir / "train-*.tar"), batch_size=8,
                         num_workers=0)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ExportStudent("export", teacher="local-dir:teacher", license="apache-2.0")])
    trainer.fit(model, datamodule=data)

    card = yaml.safe_load(Path("export/card.yaml").read_text())
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged and {k: card["metrics"][k] for k in logged} == logged and card["metrics"]["global_step"] == 3
    assert card["teacher"] == f"local-dir:{tmp_path.resolve() / 'teacher'}"  # absolute, not runs-relative
    assert card["teacher_sha256"] == teacher.manifest()["weights_sha256"]
    assert card["data"] == {"train": str(shapes_dir / "train-*.tar")}
    assert card["budget"] == {"steps": 3, "max_steps": 3, "batch_size": 8,
                              "accumulate_grad_batches": 1, "processes": 1}
    readme = Path("export/README.md").read_text()
    name, value = next(iter(logged.items()))
    assert f"| {name} | {value:.4g} |" in readme and "| Licence | apache-2.0 |" in readme
    assert "| Data | train: " in readme and "| Recipe | not recorded |" in readme  # no CLI, no recipe file

    # exported for open_clip by default: the same embeddings through open_clip's own loader and preprocessing
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")
    student = CLIPStudent.from_pretrained("export")
    picture = Image.fromarray((images(1)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy())
    pixels = preprocess(picture).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reference.eval().encode_image(pixels), student.encode_image(pixels))
        assert torch.equal(reference.encode_text(tokenizer(CAPTIONS)), student.encode_text(tokenizer(CAPTIONS)))
    assert json.loads(Path("export/open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 16


def test_export_student_records_the_recipe_files_of_xmodal_fit(shapes_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from xmodal.commands.main import main

    monkeypatch.chdir(tmp_path)
    recipe = {
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False,
                    "callbacks": [{"class_path": "ExportStudent", "init_args": {"out_dir": "export"}}]},
        "model": {"student": {"class_path": "CLIPStudent", "init_args": tiny_clip_args(shapes_dir / "tokenizer")},
                  "losses": [{"class_path": "CLIPContrastiveLoss"}]},
        "data": {"modalities": [{"class_path": "ImageModality", "init_args": {"size": 16}},
                                {"class_path": "TextModality"}],
                 "train": str(shapes_dir / "train-*.tar"), "batch_size": 8},
    }
    Path("recipe.yaml").write_text(yaml.safe_dump(recipe))
    main(["fit", "--config", "recipe.yaml"])
    card = yaml.safe_load(Path("export/card.yaml").read_text())
    assert card["recipe"] == ["recipe.yaml"] and card["budget"]["steps"] == 1
    assert "| Recipe | recipe.yaml |" in Path("export/README.md").read_text()
