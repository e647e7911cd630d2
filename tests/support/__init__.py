"""Helpers shared by the tests: tiny real models (tiny_models), foreign checkpoint layouts
written from their original modeling code's conventions (foreign_checkpoints), and the
kill-after-checkpoint subprocess (crash)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root (configs/, benchmarks/, tracerl/)
