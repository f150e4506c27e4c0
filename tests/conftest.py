"""Shared fixtures: tiny offline corpora written once per session, tiny model configs."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_VISION = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
TINY_TEXT = {"context_length": 16, "width": 32, "heads": 2, "layers": 1, "pool_type": "eos", "eos_id": 3, "pad_id": 0}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids thread-pool contention on shared 2-core CPUs (far faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``shapes`` corpus: 64 train / 32 val / 32 test samples at 16 px, 2 shards per split."""
    from xmodal.data.corpora import make_corpus

    out = tmp_path_factory.mktemp("data") / "shapes"
    make_corpus("shapes", out, seed=0, image_size=16, n_train=64, n_val=32, n_test=32, shard_size=32, progress=False)
    return out


def tiny_clip_args(tokenizer: str | Path, embed_dim: int = 16) -> dict[str, Any]:
    return {"embed_dim": embed_dim, "vision_cfg": dict(TINY_VISION), "text_cfg": dict(TINY_TEXT),
            "tokenizer": str(tokenizer)}


@contextmanager
def tiny_workspace(work: Path, cache_device: str = "cpu") -> Iterator[Path]:
    """Work inside ``work`` (the current directory meanwhile), built by :func:`build_tiny_workspace`."""
    previous = Path.cwd()
    os.chdir(work)
    try:
        build_tiny_workspace(cache_device)
        yield work
    finally:
        os.chdir(previous)


def build_tiny_workspace(cache_device: str = "cpu") -> None:
    """In the current directory: what the tiny configs point at, built the way a user would build it."""
    from xmodal.commands.main import main
    from xmodal.data.corpora import make_corpus
    from xmodal.students.clip import CLIPStudent, save_open_clip_dir

    make_corpus("shapes", "runs/data/shapes-tiny", image_size=16, n_train=48, n_val=16, n_test=16, shard_size=24,
                progress=False)
    torch.manual_seed(0)
    save_open_clip_dir(CLIPStudent(**tiny_clip_args("runs/data/shapes-tiny/tokenizer")), "runs/tiny/clip_teacher")
    main(["cache", "--config", str(ROOT / "configs/tiny/cache/clip.yaml"), "--device", cache_device])
    make_corpus("avsync", "runs/data/avsync-tiny", n_train=8, n_val=4, n_test=4, shard_size=4, progress=False)


def train_steps(module: Any, batch: dict[str, Any], steps: int, lr: float,
                params: Iterable[torch.nn.Parameter] | None = None) -> list[float]:
    """A few AdamW steps of a Distiller's summed losses on one batch (``params``: default every trainable parameter
    of ``module``); the loss after each step."""
    trainable = list(params) if params is not None else [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    values = []
    for _ in range(steps):
        total, _ = module.compute_losses(batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        values.append(total.item())
    return values
