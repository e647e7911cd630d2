"""Resource limits for one program, and the verdict statuses a test can get."""

from __future__ import annotations

import dataclasses

# Verdict statuses.
STATUSES = ("passed", "failed", "error", "timeout", "memory", "invalid_test", "output_limit")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits for one program.  Times in seconds, sizes in MiB unless named bytes.

    ``time_limit``: per test (one call into the program, or one stdio run); ``None`` uses the
    test set's own limit (``CodeTests.time_limit``).  ``setup_time``: for the program's top-level
    code in function mode (``None``: ``time_limit + 1``).  ``total_time``: wall-clock budget for the
    whole program; tests left when it runs out are ``timeout``.  ``startup_timeout`` bounds the
    sandbox's own start (an infrastructure error, not the program's fault, if exceeded).
    ``judge_memory_mb``: the judge's own address space (it holds the expected values and
    evaluates the tests on returned values).  ``isolation``: ``"auto"`` (strongest available)
    or ``"none"`` (rlimits and process groups only; for hosts where namespaces misbehave).
    ``site_packages``: ``False`` (the standard library only), ``True`` (the caller's whole
    virtual environment, readable by the program), or a tuple of top-level package names the
    program may import (``("numpy",)``; only those packages become visible).
    ``hide_paths``: extra directories to hide where the allowlist view cannot be built (see
    :mod:`.view`; with it nothing outside the allowlist is visible).
    """

    time_limit: float | None = None
    setup_time: float | None = None
    total_time: float = 60.0
    startup_timeout: float = 20.0
    memory_mb: int = 1024
    max_processes: int = 32
    file_size_mb: int = 16
    disk_mb: int = 64
    output_bytes: int = 8 << 20
    open_files: int = 128
    judge_memory_mb: int = 2048
    isolation: str = "auto"
    site_packages: bool | tuple = False
    hide_paths: tuple = ()

    def __post_init__(self):
        if self.isolation not in ("auto", "none"):
            raise ValueError(f"Limits.isolation must be 'auto' or 'none', got {self.isolation!r}")
        site = self.site_packages
        if isinstance(site, (list, tuple)):
            if not all(isinstance(n, str) and all(p.isidentifier() for p in n.split("."))
                       for n in site):
                raise ValueError(f"Limits.site_packages must name importable packages, got "
                                 f"{site!r}")
            object.__setattr__(self, "site_packages", tuple(site))
        elif not isinstance(site, bool):
            raise ValueError(f"Limits.site_packages must be true, false or a list of package "
                             f"names, got {site!r}")
        for name in ("total_time", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0")
        for name in ("memory_mb", "max_processes", "file_size_mb", "disk_mb", "output_bytes",
                     "open_files", "judge_memory_mb"):
            if not int(getattr(self, name)) > 0:
                raise ValueError(f"Limits.{name} must be a positive integer")
