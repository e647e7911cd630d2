"""Run plots (tracerl/report/plots.py): Wilson intervals, accuracy axes from 0, constant
quantities dropped, every plot of a pipeline written as a real PNG."""

from __future__ import annotations

import math

import pytest

from tracerl.report.plots import accuracy_panel, is_constant, run_plots, wilson_interval


def test_wilson_interval_known_values():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # the rule of three's cousin
    low, high = wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = wilson_interval(74, 247)  # the quickstart's held-out size: about +-5.7 points
    assert 0.05 < (high - low) / 2 < 0.06 and low < 74 / 247 < high
    assert wilson_interval(3, 0) == (0.0, 1.0)


def test_accuracy_panel_starts_at_zero_with_error_bars():
    panel = accuracy_panel("held-out", [(0, 0.3, 247), (25, 0.35, 247)], name="held-out")
    assert panel.ylim == (0.0, 1.0)
    low, high = panel.errors["held-out"]
    assert low[0] < 0.3 < high[0] and math.isclose(high[1] - low[1], high[0] - low[0], rel_tol=0.05)


def test_constant_quantities_get_no_plot(tmp_path):
    sft = [{"step": s, "loss": 5.0 / s, **({"eval_accuracy": 0.05 * s, "eval_problems": 200} if s % 2 == 0 else {})}
           for s in range(1, 7)]
    rl = [{"step": s, "reward_mean": 0.1 * s, "kl": 0.01 * (s % 3), "clip_fraction": 0.1, "value_loss": 1.0 / s,
           "nfe_per_token": 1.0, "response_length": 4.0} for s in range(1, 11)]
    written, dropped = run_plots(tmp_path, sft_rows=sft, rl_rows=rl, heldout=[(0, 0.3, 247), (10, 0.4, 247)])
    names = sorted(p.name for p in written)
    assert names == ["heldout_accuracy.png", "kl.png", "reward.png", "sft.png", "value_loss.png"]
    assert dropped == ["ref_kl", "clip_fraction", "nfe_per_token", "response_length"]  # ref_kl: not measured
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert is_constant([1.0, 1.0 + 1e-12]) and not is_constant([1.0, 1.01])
