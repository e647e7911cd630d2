"""Coupled RL: like random masking, but every corruption is paired with its complement, so each
response token is a target exactly once per pair (lower-variance estimate; objectives/rl.py)."""

from __future__ import annotations

from tracerl.rl.algorithms import register_algorithm
from tracerl.rl.algorithms.random_masking import RandomMasking


@register_algorithm
class Coupled(RandomMasking):
    name = "coupled"
