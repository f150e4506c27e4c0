"""Plug-in registration: a third-party package's teacher, student and loss work in a recipe by short class name.

The promise checked here: a new teacher/student pair with a new loss touches the YAML, one file per new component
(plus its entry point), and its test; nothing in xmodal is edited.
"""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from xmodal.commands.main import main
from xmodal.plugins import PluginWarning, load_plugins

TEACHER = '''
import torch
from torch import nn


class ToyTeacher(nn.Module):
    output_keys = ("image.emb",)

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.register_buffer("projection", torch.randn(3 * 16 * 16, dim, generator=torch.Generator().manual_seed(0)))

    def forward(self, batch):
        return {"image.emb": batch["image"].float().flatten(1) @ self.projection}

    def manifest(self):
        return {"teacher": "ToyTeacher", "output_keys": list(self.output_keys)}
'''

STUDENT = '''
from torch import nn


class ToyStudent(nn.Module):
    output_keys = ("image.emb",)

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 16 * 16, dim)

    def forward(self, batch):
        return {"image.emb": self.head(batch["image"].float().flatten(1))}
'''

LOSS = '''
import torch.nn.functional as F

from xmodal.contracts import DistillLoss

VALUES = []


class ToyMSELoss(DistillLoss):
    def __init__(self, student_key: str = "image.emb", teacher_key: str = "image.emb", weight: float = 1.0) -> None:
        super().__init__(student_key, teacher_key, weight)

    def forward(self, s, t, batch):
        loss = F.mse_loss(s, t)
        VALUES.append(float(loss.detach()))
        return loss
'''

RECIPE = """
seed_everything: 0
trainer: {{accelerator: cpu, logger: false, enable_checkpointing: false, enable_progress_bar: false}}
model:
  student: {{class_path: ToyStudent, init_args: {{dim: 8}}}}
  teacher: {{class_path: ToyTeacher, init_args: {{dim: 8}}}}
  losses:
    - class_path: ToyMSELoss
data:
  modalities:
    - class_path: ImageModality
      init_args: {{size: 16}}
  train: {train}
  batch_size: 8
"""


def write_package(site: Path, package: str, modules: dict[str, str]) -> None:
    """``site/package/<module>.py`` for each module, and a dist-info whose entry points name every module."""
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    for module, source in modules.items():
        (site / package / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    points = "".join(f"{module} = {package}.{module}\n" for module in modules)
    (info / "entry_points.txt").write_text(f"[xmodal.plugins]\n{points}")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on ``sys.path`` for third-party packages; their modules are forgotten afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in [name for name in sys.modules if name.startswith("toykd")]:
        del sys.modules[name]


def test_third_party_teacher_student_and_loss_by_short_name(site: Path, shapes_dir: Path, tmp_path: Path) -> None:
    write_package(site, "toykd", {"teacher": TEACHER, "student": STUDENT, "loss": LOSS})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(train=shapes_dir / "train-*.tar"))
    main(["fit", "--config", str(recipe), "--trainer.fast_dev_run=true"])
    values = sys.modules["toykd.loss"].VALUES
    assert len(values) == 1 and math.isfinite(values[0]) and values[0] > 0


def test_a_broken_plugin_warns_and_the_others_still_load(site: Path) -> None:
    write_package(site, "toykd_broken", {"student": STUDENT, "broken": "import a_module_that_is_not_installed\n"})
    with pytest.warns(PluginWarning, match=r"'broken' \(toykd_broken\.broken, from toykd_broken\).*a_module_that"):
        loaded = load_plugins()
    assert "toykd_broken.student" in loaded and "toykd_broken.broken" not in loaded
    assert "xmodal.losses.logits" in loaded and "xmodal.modalities.image" in loaded
