"""The performance benchmark's pure helpers: break-even arithmetic, step timing arithmetic, parsing and tables."""

from __future__ import annotations

import math

import pytest
import torch

from bench.perf_parts import (
    break_even_epochs,
    format_break_even,
    grad_free,
    markdown_report,
    parse_max_rss_kb,
    per_step_ms,
    ratio,
    reading,
    slice_batch,
)
from bench.report import fmt, md_table


def test_break_even_is_build_time_over_the_saving_per_epoch() -> None:
    assert break_even_epochs(30.0, live_epoch_s=20.0, cached_epoch_s=5.0) == pytest.approx(2.0)
    assert break_even_epochs(1.0, 10.0, 10.0) is None  # no saving: never
    assert break_even_epochs(1.0, 10.0, 12.0) is None  # cached is slower: never
    assert format_break_even(2.0) == "2 epochs (2.00)"
    assert format_break_even(2.01).startswith("3 epochs")
    assert format_break_even(None).startswith("never")


def test_per_step_ms_covers_whole_iterations_after_the_warm_up() -> None:
    stamps = [0.5, 1.0, 1.1, 1.3, 1.6]  # end of steps 0..4
    assert per_step_ms(stamps, warmup=2) == pytest.approx(1000 * (1.6 - 1.0) / 3)
    with pytest.raises(ValueError):
        per_step_ms(stamps, warmup=5)
    with pytest.raises(ValueError):
        per_step_ms(stamps, warmup=0)


def test_ratio_and_cells() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert fmt(None) == "-" and fmt(float("nan")) == "-" and fmt(1.234) == "1.23" and fmt(7) == "7"
    assert md_table(["a", "b"], [[1, 2.5]]) == "| a | b |\n|---|---|\n| 1 | 2.50 |"


def test_parse_max_rss_from_gnu_time() -> None:
    text = "\tUser time (seconds): 1.0\n\tMaximum resident set size (kbytes): 123456\n\tExit status: 0\n"
    assert parse_max_rss_kb(text) == 123456
    assert parse_max_rss_kb("no such line") is None


def test_slice_batch_cuts_tensors_and_lists_only() -> None:
    batch = {"image": torch.zeros(4, 3), "caption": ["a", "b", "c", "d"], "scale": torch.tensor(2.0), "n": 4}
    cut = slice_batch(batch, 2)
    assert cut["image"].shape == (2, 3) and cut["caption"] == ["a", "b"]
    assert cut["scale"].item() == 2.0 and cut["n"] == 4


def test_grad_free_detects_kept_activations() -> None:
    w = torch.ones(2, requires_grad=True)
    assert grad_free({"a": torch.ones(2), "s": 3.0})
    assert not grad_free({"a": w * 2})


def test_markdown_report_has_every_measured_section() -> None:
    results = {
        "mode": "smoke", "date": "2026-01-01", "reading": [],
        "machine": {"cpu_count": 2, "torch_threads": 1, "torch": "2.x", "device": "cpu"},
        "overhead": {"xmodal_ms": 10.5, "plain_ms": 10.0, "ratio": 1.05},
        "cache": {"live_epoch_s": 20.0, "build_s": 30.0, "cached_epoch_s": 5.0, "break_even": 2.0,
                  "cache_dtype": "float16", "read_only_epoch_s": {"source": 1.0, "cache": 1.2},
                  "top_k_logits_option": False},
        "loader": {"clip": {"batch_size": 128, "config_workers": 1, "step_samples_per_s": 100.0, "verdict": "keeps up",
                            "workers": {"0": {"samples_per_s": 500.0}, "1": {"samples_per_s": 900.0}}}},
        "latency": {"clip": {"teacher_params": 10, "student_params": 1,
                             "ms": {"cpu": {"1": {"teacher": 4.0, "student": 1.0}}}},
                    "lipreading": {"skipped": "no Whisper"}},
        "memory": {"clip": {"max_rss_mb": 900.0, "steps": 2}},
    }
    results["reading"] = reading(results)
    page = markdown_report(results)
    for title in ("Framework overhead", "Teacher cache", "Data loading", "Student against teacher", "Peak RSS"):
        assert title in page
    assert "1.050x" in page and "2 epochs (2.00)" in page and "4.0x" in page and "no Whisper" in page
    assert any("not a measurement" in line for line in results["reading"])
    assert any("not offered" in line for line in results["reading"])
