"""The wheel installs the plug-in folders inside the package (``xmodal.modalities``...), never as top-level packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "xmodal", "modalities", "teachers", "students")
EXPECTED = (
    "xmodal/modalities/image.py",
    "xmodal/teachers/open_clip.py",
    "xmodal/students/clip.py",
    "xmodal/data/corpora/shapes.py",
    "xmodal/eval/cli.py",
)


def copy_sources(dst: Path) -> Path:
    """What the build needs, copied so that setuptools' ``build/`` and ``*.egg-info`` land outside the repo."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = copy_sources(tmp_path_factory.mktemp("src"))
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = list(dist.glob("xmodal-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_maps_plugin_folders_into_the_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert all(path in names for path in EXPECTED), sorted(set(EXPECTED) - names)
    top_level = {name.split("/", 1)[0] for name in names}
    assert not top_level & {"modalities", "teachers", "students"}, sorted(top_level)
    assert {"xmodal"} == {t for t in top_level if not t.endswith((".dist-info", ".data"))}


def test_wheel_ships_every_plugin_module_and_the_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "xmodal = xmodal.cli:main" in archive.read(entry_points).decode()
    for folder in ("modalities", "teachers", "students"):
        for module in (REPO / folder).glob("*.py"):
            assert f"xmodal/{folder}/{module.name}" in names
