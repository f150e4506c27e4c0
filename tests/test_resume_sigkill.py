"""A fit killed with SIGKILL mid-epoch, resumed with ``--ckpt_path``, ends with the weights of an uninterrupted fit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tests.test_distiller import write_config

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 8  # the shapes fixture gives 4 steps an epoch: step 3 is mid-epoch 0


class SlowAfter(L.Callback):
    """Sleeps after each step past ``step``, so the test can kill the process before it finishes."""

    def __init__(self, step: int = 3, seconds: float = 1.0) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            time.sleep(self.seconds)


def fit_command(config: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xmodal.commands", "fit", "--config", str(config),
            "--trainer.max_steps", str(MAX_STEPS),
            "--trainer.enable_checkpointing", "true", "--trainer.default_root_dir", str(root),
            "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'steps'}",
            "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1", *extra]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def weights(root: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(next((root / "steps").glob(f"*-step={step}.ckpt")), weights_only=False)["state_dict"]


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(shapes_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", shapes_dir)
    env = environment()
    reference = subprocess.run(fit_command(config, tmp_path / "ref"), cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_root = tmp_path / "killed"
    slow = ["--trainer.callbacks+=tests.test_resume_sigkill.SlowAfter"]
    process = subprocess.Popen(fit_command(config, killed_root, *slow), cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((killed_root / "steps").glob("*-step=3.ckpt")) and process.poll() is None:
        assert time.monotonic() < deadline, "the fit never reached step 3"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL  # killed, not finished
    assert not list((killed_root / "steps").glob(f"*-step={MAX_STEPS}.ckpt"))

    checkpoint = next((killed_root / "steps").glob("*-step=3.ckpt"))
    resumed = subprocess.run(fit_command(config, tmp_path / "resumed", "--ckpt_path", str(checkpoint)), cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = weights(tmp_path / "ref", MAX_STEPS), weights(tmp_path / "resumed", MAX_STEPS)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name} differs after the kill and resume"
