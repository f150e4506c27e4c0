"""bench/payoff.py's pure parts: config edits, the diagnostics read back from a CSV log and the printed table,
and the Markdown report of a fabricated results JSON. The pipeline itself (corpus, Whisper, fits) is not run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.payoff import (
    ALONE_METHOD,
    DISTILL_TERMS,
    TUNED_METHOD,
    diag_rows,
    kept_pieces,
    printed_table,
    render,
    standardize,
    validate_at_end,
)


def recipe() -> dict[str, Any]:
    return {"trainer": {"max_steps": 120, "val_check_interval": 500},
            "model": {"losses": [{"init_args": {}} for _ in range(4)]}}


def test_standardize_sets_stored_statistics_on_the_distillation_terms_only() -> None:
    config = standardize(recipe(), Path("cache/train/manifest.json"))
    losses = config["model"]["losses"]
    assert "normalize" not in losses[0]["init_args"]
    for index in DISTILL_TERMS:
        norm = losses[index]["init_args"]["normalize"]
        assert norm["init_args"] == {"mode": "standardize", "stats": "cache/train/manifest.json"}


def test_validate_at_end_validates_once_after_the_last_step() -> None:
    config = recipe()
    validate_at_end(config, 3)
    assert config["trainer"]["val_check_interval"] == 120
    assert config["trainer"]["limit_val_batches"] == 3
    assert config["trainer"]["check_val_every_n_epoch"] is None


def test_diag_rows_groups_logged_values_by_step_and_term() -> None:
    rows = [{"step": "0", "diag/char_ce/value": "2.5", "diag/libs_frame/cos_task": "-0.3", "train/loss": "1"},
            {"step": "1", "diag/char_ce/value": "", "train/loss": "0.9"},
            {"step": "20", "diag/libs_frame/grad_all": "0.7"}]
    assert diag_rows(rows) == {"0": {"char_ce": {"value": 2.5}, "libs_frame": {"cos_task": -0.3}},
                               "20": {"libs_frame": {"grad_all": 0.7}}}


def test_printed_table_cuts_the_block_out_of_captured_output() -> None:
    text = ("Epoch 0\nxmodal gradient diagnostics at step 0:\nterm  value\nchar_ce  2.5\n|g|: ...\n"
            "flags: dominates > 10x\nEpoch 0: 100%\n")
    assert printed_table(text) == ("xmodal gradient diagnostics at step 0:\nterm  value\nchar_ce  2.5\n|g|: ...\n"
                                   "flags: dominates > 10x")
    assert printed_table("no table here") is None


def results(runs: dict[str, Any]) -> dict[str, Any]:
    term = {"value": 0.5, "grad_visual": 0.1, "grad_encoder": 0.2, "grad_all": 0.25, "ratio": 1.5, "cos_task": -0.2}
    return {
        "config": {"adapt_steps": 100, "video_size": 32, "diagnose_steps": 20, "steps": 150},
        "stats": {"batches": 10, "split": "train",
                  "keys": {"whisper/frames": {"dims": 384, "count": 9, "mean_square": 1.47,
                                                    "energy_in_mean": 0.27, "std_min": 0.1, "std_max": 2.0,
                                                    "max_abs": 11.0}}},
        "diagnostics": {"raw": {"table": "t", "steps": {"0": {"libs_frame": term}, "1": {"libs_frame": term},
                                                         "20": {"libs_frame": term}}}},
        "tune": {"trials": 2, "steps": 120, "val_batches": 4, "trial_table": [
            {"number": 0, "state": "COMPLETE", "value": 0.91, "seconds": 100.0,
             "params": {"model.losses[1].init_args.weight": 0.1,
                        "model.losses[1].init_args.normalize.init_args.mode": "none"}},
            {"number": 1, "state": "FAIL", "value": None, "seconds": None, "params": {}}],
                 "best": {"number": 0, "value": 0.91, "params": {}}},
        "runs": runs}


def run(cer: float) -> dict[str, Any]:
    return {"eval": {"all": {"greedy_cer": cer}}}


def test_render_reports_every_finished_piece() -> None:
    text = render(results({f"{ALONE_METHOD}/seed0": run(0.9), f"{TUNED_METHOD}/seed0": run(0.8),
                           f"{ALONE_METHOD}/seed1": run(0.92), f"{TUNED_METHOD}/seed1": run(0.9)}))
    assert "| whisper/frames | 384 | 1.47 | 27.0% | 0.1-2 | 11 |" in text
    assert "**raw targets, step 0**" in text and "**raw targets, step 20**" in text
    assert "step 1**" not in text  # the CSV log's repeats between measurements
    assert "| term | value | \\|g\\| encoder | \\|g\\| visual | \\|g\\| all | x task | cos task |" in text
    assert "| libs_frame | 0.5 | 0.2 | 0.1 | 0.25 | 1.5 | -0.2 |" in text
    assert "| 0 | COMPLETE | 0.91 | 100 | none | 0.1 |" in text
    assert "Best: trial 0, val/cer 0.9100." in text
    assert f"| {ALONE_METHOD} | 2 | 0: 90.0, 1: 92.0 | 91.0 ± 1.4 |" in text
    assert "+6.00 CER points, 95% CI" in text and "over 2 seeds" in text
    assert "Not run yet." not in text


def test_render_never_reports_a_single_seed_as_a_gain() -> None:
    text = render(results({f"{ALONE_METHOD}/seed0": run(0.9), f"{TUNED_METHOD}/seed0": run(0.8)}))
    assert "from a single seed: no estimate of seed noise, not conclusive" in text


def test_render_marks_missing_pieces() -> None:
    text = render({"config": {"adapt_steps": 100, "video_size": 32, "diagnose_steps": 20, "steps": 150}})
    assert text.count("Not run yet.") == 4


def test_kept_pieces_keep_what_the_changed_settings_do_not_touch() -> None:
    config = {"adapt_steps": 100, "video_size": 32, "diagnose_steps": 20, "stats_batches": 10, "tune_trials": 4,
              "tune_steps": 120, "val_batches": 4, "steps": 120, "beam_size": 1}
    previous = {"config": config, "stats": {"s": 1}, "diagnostics": {"raw": {}}, "tune": {"t": 1}, "runs": {"r": 1},
                "cache": {}}
    assert kept_pieces(previous, config) == {"stats": {"s": 1}, "diagnostics": {"raw": {}}, "tune": {"t": 1},
                                             "runs": {"r": 1}}
    assert kept_pieces(previous, {**config, "tune_trials": 3}) == {"stats": {"s": 1}, "diagnostics": {"raw": {}}}
    assert kept_pieces(previous, {**config, "steps": 300}) == {"stats": {"s": 1}, "diagnostics": {"raw": {}},
                                                               "tune": {"t": 1}}
    assert kept_pieces(previous, {**config, "adapt_steps": 600}) == {}
