"""The sandbox package imports only the standard library and itself (its harness is shipped into
a sandbox where neither the venv nor the source tree is visible)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tracerl.sandbox

PACKAGE = Path(tracerl.sandbox.__file__).parent


def test_every_sandbox_import_is_stdlib_or_the_package_itself():
    outside = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: the package itself
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and not name.startswith("tracerl.sandbox"):
                    outside.append(f"{path.name}:{node.lineno}: {name}")
    assert len(list(PACKAGE.glob("*.py"))) > 5 and outside == []
