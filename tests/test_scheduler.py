"""The learning-rate schedule: a class_path scheduler gives the same rates per step as the old warmup+cosine."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from xmodal.distiller import ConfigKeyError, Distiller, LegacySchedulerWarning, WarmupCosineLR, build_scheduler
from xmodal.losses import CLIPContrastiveLoss
from xmodal.plugins import load_plugins

BASE_LR, STEPS, WARMUP = 0.01, 50, 10


def reference_rates(warmup: int, total: int, decay: bool = True) -> list[float]:
    """Linear warm-up to the base rate over ``warmup`` steps, then half a cosine down to 0 at ``total``."""
    rates = []
    for step in range(total):
        if step < warmup:
            factor = (step + 1) / warmup
        elif decay:
            factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        else:
            factor = 1.0
        rates.append(BASE_LR * factor)
    return rates


def rates_of(model: Distiller, max_steps: int = STEPS) -> list[float]:
    """The learning rate of each of ``max_steps`` optimizer steps, as Lightning steps the configured scheduler."""
    model._trainer = SimpleNamespace(max_steps=max_steps)  # type: ignore[assignment]  # all configure_optimizers reads
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(max_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def distiller(**kwargs: Any) -> Distiller:
    optimizer = partial(torch.optim.SGD, lr=BASE_LR)
    return Distiller(nn.Linear(2, 2), [CLIPContrastiveLoss()], optimizer=optimizer, **kwargs)


def parsed_distiller(model_config: dict[str, Any]) -> Distiller:
    """A Distiller built from a config the way ``xmodal fit`` builds it (jsonargparse, class_path injection)."""
    load_plugins()  # short class names resolve among the imported plug-ins
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Distiller, "model", sub_configs=True)
    tiny_reader = {"dim": 16, "channels": 4, "depth": 1, "max_len": 12, "dropout": 0.0}
    base = {"student": {"class_path": "LipReader", "init_args": tiny_reader},
            "losses": [{"class_path": "CharCELoss"}],
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": BASE_LR}}}
    config = parser.parse_object({"model": {**base, **model_config}})
    return parser.instantiate_classes(config).model


def test_class_path_scheduler_gives_the_warmup_cosine_rates() -> None:
    model = parsed_distiller({"scheduler": {"class_path": "WarmupCosineLR", "init_args": {"warmup_steps": WARMUP}}})
    assert rates_of(model) == pytest.approx(reference_rates(WARMUP, STEPS), rel=1e-9, abs=1e-15)


def test_old_scheduler_strings_still_load_with_the_same_rates() -> None:
    with pytest.warns(LegacySchedulerWarning, match="WarmupCosineLR"):
        cosine = parsed_distiller({"scheduler": "cosine", "warmup_steps": WARMUP})
    with pytest.warns(LegacySchedulerWarning, match="decay: false"):
        constant = distiller(scheduler="constant", warmup_steps=WARMUP)
    new_constant = distiller(scheduler=partial(WarmupCosineLR, warmup_steps=WARMUP, decay=False))
    assert rates_of(cosine) == pytest.approx(reference_rates(WARMUP, STEPS), rel=1e-9, abs=1e-15)
    assert rates_of(constant) == rates_of(new_constant) == pytest.approx(reference_rates(WARMUP, STEPS, decay=False))


def test_default_is_cosine_without_warmup_over_max_steps() -> None:
    assert rates_of(distiller(), max_steps=20) == pytest.approx(reference_rates(0, 20), rel=1e-9, abs=1e-15)


def test_total_steps_is_filled_from_max_steps_only_when_unset() -> None:
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=BASE_LR)
    assert build_scheduler(partial(WarmupCosineLR, warmup_steps=2), optimizer, 30).total_steps == 30
    assert build_scheduler(partial(WarmupCosineLR, total_steps=12), optimizer, 30).total_steps == 12
    one_cycle = build_scheduler(partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1), optimizer, 30)
    assert one_cycle.total_steps == 30  # torch's own schedulers with a total_steps parameter get it too
    step = build_scheduler(partial(torch.optim.lr_scheduler.StepLR, step_size=5), optimizer, 30)
    assert step.step_size == 5


def test_warmup_steps_beside_a_class_path_is_a_config_error() -> None:
    with pytest.raises(ConfigKeyError, match="init_args"):
        distiller(scheduler=partial(WarmupCosineLR), warmup_steps=5)
