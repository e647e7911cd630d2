"""Helpers shared by the sandbox and code-reward tests: program text, verdict statuses, and the
host's sandbox capabilities."""

from __future__ import annotations

import textwrap

from tracerl.rewards.code import sandbox_capabilities


def prog(src: str) -> str:
    return textwrap.dedent(src).lstrip("\n")


def statuses(result):
    return [v.status for v in result.verdicts]


def works_or_fail():
    """What the sandbox gives on this host; a sandbox that does not work fails the test."""
    c = sandbox_capabilities()
    assert c["works"], c
    return c
