"""PromptKD: stored class vectors, the prompted teacher and student, label-free stage 2, base-to-novel metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_TEXT, TINY_VISION
from xmodal.classvectors import ClassVectorsMismatchError, load_class_vectors, read_manifest
from xmodal.data.eval_sets import iter_tar_samples, shard_loader, write_fewshot_shards
from xmodal.eval.base2novel import ClassSplit, harmonic_mean, make_split, write_split
from xmodal.eval.loops import evaluate_base2novel
from xmodal.eval.metrics import Base2NovelAccuracy
from xmodal.modalities.prompts import PromptedCLIP
from xmodal.students.prompted import DropLabels, LabelGuard, LabelReadError, PromptedImageStudent
from xmodal.teachers.prompted import PromptedCLIPTeacher, store_class_vectors


@dataclass
class Workspace:
    data: Path
    split: Path
    teacher_clip: Path
    student_clip: Path
    stage1: Path
    vectors: Path


def save_tiny_clip(out: Path, tokenizer: Path, embed_dim: int, layers: int, seed: int) -> Path:
    from xmodal.students.clip import CLIPStudent, save_open_clip_dir

    torch.manual_seed(seed)
    vision = {**TINY_VISION, "layers": layers}
    text = {**TINY_TEXT, "layers": layers}
    return save_open_clip_dir(CLIPStudent(embed_dim, vision, text, tokenizer=str(tokenizer)), out)


@pytest.fixture(scope="module")
def ws(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A 2-layer teacher CLIP (dim 16) with random prompts exported as stage 1, and a 1-layer student CLIP (dim 8)."""
    from xmodal.zoo import save_pretrained

    root = tmp_path_factory.mktemp("promptkd")
    classes = json.loads((shapes_dir / "classes.json").read_text())["classes"]
    split = write_split(make_split(classes), root / "split.json")
    teacher_clip = save_tiny_clip(root / "teacher_clip", shapes_dir / "tokenizer", 16, 2, seed=0)
    student_clip = save_tiny_clip(root / "student_clip", shapes_dir / "tokenizer", 8, 1, seed=1)
    torch.manual_seed(2)
    prompted = PromptedCLIP(str(teacher_clip), str(split), split=str(split), train_subset="base", n_ctx=2,
                            text_depth=2, vision_n_ctx=2, vision_depth=2, init_std=0.5)
    stage1 = save_pretrained(prompted, prompted.init_args, root / "stage1")
    vectors = store_class_vectors(prompted, root / "class_vectors.safetensors")
    return Workspace(shapes_dir, split, teacher_clip, student_clip, stage1, vectors)


def labelled_batch(ws: Workspace, n: int = 16) -> dict:
    from xmodal.data.wds import make_pipeline, prepare_on_device
    from xmodal.modalities.image import ImageModality

    modalities = [ImageModality(16)]
    batch = next(iter(make_pipeline(str(ws.data / "train-*.tar"), modalities, n, train=False)))
    assert "label" in batch  # the shards are labelled: stage 2 must ignore that
    return prepare_on_device(batch, modalities, train=False)


def test_stored_class_vectors_equal_the_teachers_recomputed_ones(ws: Workspace) -> None:
    from xmodal.zoo import create_model

    reloaded = create_model(str(ws.stage1))
    assert isinstance(reloaded, PromptedCLIP)
    stored = load_class_vectors(ws.vectors, teacher=reloaded.identity(), classes=reloaded.all_classes)
    with torch.no_grad():
        recomputed = reloaded.eval().class_embeddings()
    assert stored.vectors.shape == (48, 16)
    torch.testing.assert_close(stored.vectors, recomputed, atol=1e-6, rtol=0)
    assert stored.logit_scale == pytest.approx(float(reloaded.model.logit_scale.exp()))
    manifest = read_manifest(ws.vectors)
    assert manifest["teacher"]["prompts_sha256"] == reloaded.prompts_sha256() and len(manifest["classes"]) == 48


def test_class_vectors_refuse_other_prompts(ws: Workspace) -> None:
    from xmodal.zoo import create_model

    other = create_model(str(ws.stage1))
    with torch.no_grad():
        other.text_ctx.add_(0.1)
    with pytest.raises(ClassVectorsMismatchError, match="prompts_sha256"):
        load_class_vectors(ws.vectors, teacher=other.identity())
    with pytest.raises(ClassVectorsMismatchError, match="classes"):
        load_class_vectors(ws.vectors, classes=["red circle"])


def test_stage2_teacher_uses_stored_vectors_and_never_runs_text(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = PromptedCLIPTeacher(str(ws.stage1), str(ws.vectors))
    batch = labelled_batch(ws, 8)
    expected = teacher.prompted.class_embeddings()  # before the text tower is disabled

    def no_text(*args: object) -> None:
        raise AssertionError("the stage-2 teacher recomputed text features")

    monkeypatch.setattr(teacher.prompted, "encode_text", no_text)
    out = teacher(LabelGuard(batch))
    emb = teacher.prompted.embed_images(batch["image"])
    torch.testing.assert_close(out["image.logits"], teacher.logit_scale * emb @ expected.T, atol=1e-5, rtol=1e-5)
    assert out["image.logits"].shape == (8, 48) and not out["image.logits"].requires_grad
    assert teacher.manifest()["prompts_sha256"] == teacher.prompted.prompts_sha256()


def test_label_guard_raises_on_any_label_read() -> None:
    from xmodal.losses import HardLabelLoss

    guarded = LabelGuard({"image": torch.zeros(2, 3, 4, 4), "label": torch.tensor([0, 1])})
    assert "label" not in dict(guarded) and list(guarded) == ["image"]
    for read in (lambda b: b["label"], lambda b: b.get("label"), lambda b: "label" in b, lambda b: b.pop("label")):
        with pytest.raises(LabelReadError):
            read(guarded)
    with pytest.raises(LabelReadError):
        HardLabelLoss("image.logits")(torch.zeros(2, 3), None, guarded)


def test_stage2_reads_no_label(ws: Workspace) -> None:
    from xmodal.distiller import Distiller
    from xmodal.losses import KLDivLoss

    torch.manual_seed(0)
    student = PromptedImageStudent(str(ws.student_clip), str(ws.vectors), n_ctx=2, depth=1)
    teacher = PromptedCLIPTeacher(str(ws.stage1), str(ws.vectors))
    distiller = Distiller(student, [KLDivLoss("image.logits", "image.logits", temperature=2.0)], teacher=teacher)
    total, terms = distiller.compute_losses(LabelGuard(labelled_batch(ws)))
    total.backward()
    assert torch.isfinite(total) and set(terms) == {"kl"}
    assert student.prompts.prompts.grad is not None and student.prompts.prompts.grad.abs().sum() > 0


def test_stage2_fit_changes_only_prompts_and_projector(ws: Workspace, tmp_path: Path) -> None:
    import lightning as L

    from xmodal.data.wds import WdsDataModule
    from xmodal.distiller import Distiller
    from xmodal.losses import KLDivLoss
    from xmodal.modalities.image import ImageModality

    class NoLabelSeen(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, i: int) -> None:
            assert "label" not in batch

    torch.manual_seed(0)
    student = PromptedImageStudent(str(ws.student_clip), str(ws.vectors), n_ctx=2, depth=1, projector="mlp")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher = PromptedCLIPTeacher(str(ws.stage1), str(ws.vectors))
    model = Distiller(student, [KLDivLoss("image.logits", "image.logits", temperature=1.0)], teacher=teacher,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    data = WdsDataModule([ImageModality(16)], train=str(ws.data / "train-*.tar"), batch_size=16, shuffle_buffer=1)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[DropLabels(), NoLabelSeen()])
    trainer.fit(model, data)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("prompts.", "projector.")) for k in changed), changed
    assert "prompts.prompts" in changed
    assert set(student.trainable_names()) == {"prompts.prompts", "projector.0.weight", "projector.0.bias",
                                              "projector.2.weight", "projector.2.bias"}


def test_stage1_changes_only_prompts(ws: Workspace, tmp_path: Path) -> None:
    from xmodal.data.wds import make_pipeline, prepare_on_device
    from xmodal.losses import HardLabelLoss
    from xmodal.modalities.image import ImageModality

    split = json.loads(ws.split.read_text())
    shots = write_fewshot_shards(str(ws.data / "train-*.tar"), tmp_path / "fewshot", ClassSplit(**split), shots=1)
    torch.manual_seed(0)
    model = PromptedCLIP(str(ws.teacher_clip), str(ws.split), split=str(ws.split), train_subset="base",
                         ctx_init="a photo of a", text_depth=2, vision_depth=2)
    assert model.n_ctx == 4  # from ctx_init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    modalities = [ImageModality(16)]
    batch = prepare_on_device(next(iter(make_pipeline(shots, modalities, 24, train=False))), modalities, False)
    assert batch["label"].max() < 24  # base-local labels
    out = model.train()(batch)
    assert out["image.logits"].shape == (batch["image"].shape[0], 24)
    HardLabelLoss("image.logits")(out["image.logits"], None, batch).backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"text_ctx", "text_deep", "visual_prompts.prompts"}
    assert not model.model.training


def test_fewshot_shards_keep_only_base_labels(ws: Workspace, tmp_path: Path) -> None:
    split = ClassSplit(**json.loads(ws.split.read_text()))
    pattern = write_fewshot_shards(str(ws.data / "train-*.tar"), tmp_path, split, shots=1)
    metas = [json.loads(s["json"]) for s in iter_tar_samples(pattern)]
    assert {m["global_label"] for m in metas} <= set(split.base)
    assert all(split.base[m["label"]] == m["global_label"] for m in metas)
    assert len(metas) == len({m["global_label"] for m in metas})  # one shot per class
    drawn = write_fewshot_shards(str(ws.data / "train-*.tar"), tmp_path / "drawn", split, shots=2, seed=3)
    labels = [json.loads(s["json"])["global_label"] for s in iter_tar_samples(drawn)]
    train = [json.loads(s["json"])["label"] for s in iter_tar_samples(str(ws.data / "train-*.tar"))]
    assert sorted(labels) == sorted(c for c in split.base for _ in range(min(2, train.count(c))))


def base2novel_metrics(logits: torch.Tensor, labels: torch.Tensor, split: ClassSplit) -> dict[str, float | int]:
    metric = Base2NovelAccuracy(split)
    metric.update(logits, labels)
    return {key: value.item() for key, value in metric.compute().items()}


def test_base2novel_metrics_and_hm() -> None:
    split = ClassSplit(["a", "b", "c", "d"], base=[0, 1], novel=[2, 3])
    # rows: base a (right among base, though novel c scores higher), base b (wrong), novel c (right), novel d (tie)
    logits = torch.tensor([[0.9, 0.1, 5.0, 0.0], [0.8, 0.2, 0.0, 0.0], [9.0, 0.0, 0.7, 0.3], [0.0, 0.0, 0.5, 0.5]])
    labels = torch.tensor([0, 1, 2, 3])
    metrics = base2novel_metrics(logits, labels, split)
    assert metrics["base"] == 0.5 and metrics["novel"] == 0.5 and metrics["n_base"] == 2
    assert metrics["hm"] == pytest.approx(0.5)
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(1.0, 0.0) == 0.0
    only_base = base2novel_metrics(logits[:2], labels[:2], split)
    assert only_base["novel"] == 0.0 and only_base["hm"] == 0.0 and only_base["n_novel"] == 0
    with pytest.raises(ValueError, match="both base and novel"):
        ClassSplit(["a", "b"], [0], [0, 1])
    assert make_split(["a", "b", "c"]).base == [0, 1]


def test_inference_needs_only_the_student_and_its_class_vectors(ws: Workspace, tmp_path: Path) -> None:
    import shutil

    from xmodal.commands.main import main
    from xmodal.zoo import create_model, save_pretrained

    torch.manual_seed(0)
    student = PromptedImageStudent(str(ws.student_clip), str(ws.vectors), n_ctx=2, depth=1)
    export = save_pretrained(student, student.init_args, tmp_path / "student")
    vectors_copy = tmp_path / "moved.safetensors"
    shutil.copy(ws.vectors, vectors_copy)
    reloaded = create_model(str(export))
    assert isinstance(reloaded, PromptedImageStudent)
    assert not any("prompted" in k or "text" in k for k in reloaded.state_dict())  # no teacher, no text tower
    images = labelled_batch(ws, 4)["image"]
    torch.testing.assert_close(reloaded.eval().classify(images), student.eval().classify(images))

    split = ClassSplit(**json.loads(ws.split.read_text()))
    metrics = evaluate_base2novel(reloaded, shard_loader(str(ws.data / "test-*.tar"), 16, 16, 0), split)
    assert metrics["n_base"] + metrics["n_novel"] == 32 and 0 <= metrics["hm"] <= 1
    out = tmp_path / "b2n.json"
    main(["eval", "base2novel", "--model", str(export), "--split", str(ws.split), "--shards",
          str(ws.data / "test-*.tar"), "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["metrics"]["hm"] == pytest.approx(metrics["hm"])


def test_eval_cli_teacher_and_zero_shot_student(ws: Workspace, tmp_path: Path) -> None:
    from xmodal.commands.main import main
    from xmodal.students.clip import CLIPStudent
    from xmodal.zoo import save_pretrained

    stage1_out, zs_out = tmp_path / "t.json", tmp_path / "zs.json"
    common = ["--split", str(ws.split), "--shards", str(ws.data / "test-*.tar"), "--device", "cpu"]
    main(["eval", "base2novel", "--model", str(ws.stage1), *common, "--class-vectors", str(ws.vectors),
          "--out", str(stage1_out)])
    args = json.loads((ws.student_clip / "open_clip_config.json").read_text())["model_cfg"]
    clip = CLIPStudent(args["embed_dim"], args["vision_cfg"], args["text_cfg"], tokenizer=str(ws.data / "tokenizer"))
    save_pretrained(clip, clip.init_args, tmp_path / "plain")
    main(["eval", "base2novel", "--model", str(tmp_path / "plain"), *common, "--out", str(zs_out)])
    for path in (stage1_out, zs_out):
        results = json.loads(path.read_text())
        assert set(results["metrics"]) == {"base", "novel", "hm", "n_base", "n_novel"}
        assert results["skipped"] == {"samples": 0, "failed_shards": []}


def test_class_vectors_verb(ws: Workspace, tmp_path: Path) -> None:
    from xmodal.commands.main import main

    out = tmp_path / "cv.safetensors"
    main(["class-vectors", "--teacher", str(ws.stage1), "--out", str(out)])
    torch.testing.assert_close(load_class_vectors(out).vectors, load_class_vectors(ws.vectors).vectors)
