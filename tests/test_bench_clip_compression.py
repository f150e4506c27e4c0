"""The CLIP compression benchmark's own logic (steps-to-reach) and the harness's config path rewriting."""

from __future__ import annotations

from bench.clip_compression_report import steps_to_reach
from bench.harness import rewrite


def test_rewrite_replaces_longest_prefix_once() -> None:
    config = {"a": ["runs/demo/teacher", {"b": "local-dir:runs/demo/x"}], "n": 3}
    mapping = {"runs/demo": "/w/shapes", "runs/demo/teacher": "/abs/runs/demo/teacher"}
    assert rewrite(config, mapping) == {"a": ["/abs/runs/demo/teacher", {"b": "local-dir:/w/shapes/x"}], "n": 3}


def test_steps_to_reach_uses_the_seed_mean_curve() -> None:
    curves = [[{"step": 50, "zeroshot_top1": 0.2}, {"step": 100, "zeroshot_top1": 0.5}],
              [{"step": 50, "zeroshot_top1": 0.5}, {"step": 100, "zeroshot_top1": 0.3}]]
    assert steps_to_reach(curves, 0.35) == 50  # means 0.35, 0.40
    assert steps_to_reach(curves, 0.36) == 100
    assert steps_to_reach(curves, 0.41) is None
    assert steps_to_reach([curves[0], curves[1][:1]], 0.39) is None  # a step not probed in every seed is skipped
