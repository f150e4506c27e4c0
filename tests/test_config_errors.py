"""Configuration mistakes give one line that names the key and the file, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_clip_args
from tests.test_distiller import write_config
from xmodal.commands.main import main
from xmodal.students.clip import CLIPStudent, save_open_clip_dir


def one_line_exit(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    message = str(caught.value.code)
    assert "\n" not in message.strip() and "Traceback" not in message
    return message


def test_typo_inside_a_nested_dict_names_the_key_and_the_file(shapes_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = tiny_clip_args(shapes_dir / "tokenizer")
    args["vision_cfg"] = {**args["vision_cfg"], "patch_sze": 8}
    config = write_config(tmp_path / "nested.yaml", shapes_dir,
                          student={"class_path": "CLIPStudent", "init_args": args})
    message = one_line_exit(["fit", "--config", str(config)])
    assert "nested.yaml" in message and "patch_sze" in message


def test_a_shard_pattern_matching_nothing_names_the_pattern_and_the_file(shapes_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "empty.yaml", shapes_dir)
    data = yaml.safe_load(config.read_text())
    data["data"]["train"] = str(tmp_path / "nowhere-*.tar")
    config.write_text(yaml.safe_dump(data))
    message = one_line_exit(["fit", "--config", str(config)])
    assert "empty.yaml" in message and "nowhere-*.tar" in message


def test_mismatched_loss_shapes_name_the_loss_and_the_file(shapes_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_open_clip_dir(CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer", embed_dim=24)), tmp_path / "teacher")
    config = write_config(tmp_path / "shapes.yaml", shapes_dir,
                          teacher={"class_path": "OpenCLIPTeacher",
                                   "init_args": {"model_name": f"local-dir:{tmp_path / 'teacher'}"}},
                          losses=[{"class_path": "CLIPContrastiveLoss"},
                                  {"class_path": "FeatureMSELoss",
                                   "init_args": {"student_key": "image.emb", "teacher_key": "image.emb",
                                                 "name": "image_mse"}}])
    message = one_line_exit(["fit", "--config", str(config)])
    assert "image_mse" in message and "shapes.yaml" in message
