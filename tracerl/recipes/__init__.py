"""Recipes: what each ``tracerl`` command runs (sft, rl, eval, score, quickstart, bench), with the
shipped YAML beside them.  Everything below this package is library; nothing there imports it
(an import-linter contract in pyproject.toml, checked by the test command)."""
