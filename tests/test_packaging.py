"""The wheel installs the plug-in folders inside the package (``xmodal.modalities``...), never as top-level packages."""

from __future__ import annotations

import re
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
    "xmodal/commands/main.py",
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
        assert "xmodal = xmodal.commands.main:main" in archive.read(entry_points).decode()
    for folder in ("modalities", "teachers", "students"):
        for module in (REPO / folder).glob("*.py"):
            assert f"xmodal/{folder}/{module.name}" in names


IMPORT_GRAPH = REPO.parent / "shared" / "tools" / "import_graph.py"


def cycles_outside_bench(report: str) -> list[str]:
    """The cycles of ``import_graph.py``'s report that involve a file outside ``bench/``."""
    cycles: list[list[str]] = []
    for line in report.splitlines():
        if line.startswith("cycle "):
            cycles.append([line])
        elif line.startswith("  ") and cycles:
            cycles[-1].append(line)
    return ["\n".join(c) for c in cycles if any(not edge.strip().startswith("bench/") for edge in c[1:])]


@pytest.mark.skipif(not IMPORT_GRAPH.is_file(), reason="the import graph tool is not beside the repository")
def test_no_import_cycle_outside_bench() -> None:
    result = subprocess.run([sys.executable, str(IMPORT_GRAPH), str(REPO)], capture_output=True, text=True,
                            timeout=120)
    assert not cycles_outside_bench(result.stdout), result.stdout


def test_nothing_below_the_command_layer_imports_it() -> None:
    """``xmodal.commands`` is the top layer: no module below it imports it."""
    statement = re.compile(r"^\s*(from|import)\s+xmodal\.commands\b", re.MULTILINE)
    folders = ("xmodal", "modalities", "teachers", "students")
    below = [path for folder in folders for path in (REPO / folder).rglob("*.py")
             if "commands" not in path.relative_to(REPO).parts]
    importers = [str(path.relative_to(REPO)) for path in below if statement.search(path.read_text())]
    assert not importers, importers
