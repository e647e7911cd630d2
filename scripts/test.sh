#!/usr/bin/env bash
# Install everything into .venv and run the test suite.  Used by the README and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
# Headless Chromium (Debian's package) for the trace-viewer page test; best effort: where it
# cannot be installed that test is skipped and says why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
        || echo "warning: could not install chromium; the trace page test will be skipped" >&2
fi
# The architecture rules (layers, recipes on top, stdlib-only sandbox): pyproject.toml [tool.importlinter].
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
