"""The benchmark harness's statistics: mean ± sample std, the paired difference over shared seeds with its 95 % t
interval (checked against a hand computation), the verdict, and the run-key bookkeeping."""

from __future__ import annotations

import math

import pytest

from bench.harness import Run, plan, run_pending
from bench.report import paired_line
from bench.stats import mean_std, paired, seed_values, split_key, t_quantile, verdict


def test_mean_std_uses_the_sample_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_interval_by_hand() -> None:
    a = {0: 0.50, 1: 0.60, 2: 0.55, 3: 0.70}
    b = {0: 0.45, 1: 0.50, 2: 0.52, 3: 0.58, 4: 0.90}  # seed 4 has no partner: left out
    diff = paired(a, b, scale=100.0)
    assert diff is not None and diff.seeds == (0, 1, 2, 3)
    # differences 5, 10, 3, 12 points: mean 7.5; squared deviations 6.25 + 6.25 + 20.25 + 20.25 = 53, / 3 -> std
    assert diff.differences == pytest.approx((5.0, 10.0, 3.0, 12.0))
    std = math.sqrt(53 / 3)
    assert diff.mean == pytest.approx(7.5) and diff.std == pytest.approx(std)
    half = 3.182 * std / math.sqrt(4)  # t(0.975, 3 degrees of freedom) = 3.182
    assert diff.low == pytest.approx(7.5 - half) and diff.high == pytest.approx(7.5 + half)
    assert diff.low == pytest.approx(0.81, abs=0.01) and diff.high == pytest.approx(14.19, abs=0.01)
    assert verdict(diff) == "+7.50 points, 95% CI [+0.81, +14.19] over 4 seeds: a clear gain"


def test_verdict_reads_noise_losses_and_single_seeds() -> None:
    noisy = paired({0: 1.0, 1: 3.0, 2: 2.0}, {0: 2.0, 1: 1.0, 2: 1.0})  # differences -1, 2, 1
    assert noisy is not None and noisy.low is not None and noisy.low < 0 < (noisy.high or 0)
    assert verdict(noisy).endswith("within seed noise")
    worse = paired({0: 1.0, 1: 1.1}, {0: 2.0, 1: 2.0})
    assert worse is not None and verdict(worse).endswith("a clear loss")
    single = paired({0: 3.0}, {0: 1.0})
    assert single is not None and single.low is None and "single seed" in verdict(single)
    assert paired({0: 1.0}, {1: 1.0}) is None
    assert paired_line("kd - scratch", None).endswith("not measured (no seed has both runs)")
    assert "per seed: -1.00, +2.00, +1.00" in paired_line("x", noisy)


def test_t_quantiles() -> None:
    assert t_quantile(1) == 12.706 and t_quantile(2) == 4.303 and t_quantile(30) == 2.042
    assert t_quantile(200) == 1.960


def test_seed_values_read_nested_metrics_of_one_method() -> None:
    runs = {"kd/seed0": {"eval": {"all": {"cer": 0.2}}}, "kd/seed1": {"eval": {"all": {}}},
            "kd_mixup/seed0": {"eval": {"all": {"cer": 0.9}}}}
    assert seed_values(runs, "kd", "eval", "all", "cer") == {0: 0.2}
    assert split_key("affinity+auto/seed12") == ("affinity+auto", 12)


def test_runs_resume_and_keep_their_order() -> None:
    recipes = {"a": "a.yaml", "b": "b.yaml"}
    assert [(r.method, r.seed) for r in plan(recipes, [0, 1], 10)] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    by_seed = plan(recipes, [0, 1], {"a": 10, "b": 20}, seed_major=True)
    assert by_seed == [Run("a", 0, "a.yaml", 10), Run("b", 0, "b.yaml", 20), Run("a", 1, "a.yaml", 10),
                       Run("b", 1, "b.yaml", 20)]
    done: dict[str, object] = {"a/seed0": "old"}
    saved: list[int] = []
    run_pending(plan({"a": "a.yaml"}, [0, 1], 10), done, lambda run: run.name, lambda: saved.append(len(done)))
    assert done == {"a/seed0": "old", "a/seed1": "a-seed1"} and saved == [2]
