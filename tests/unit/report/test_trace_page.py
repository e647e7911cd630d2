"""The trace-viewer page: data correctness, and a real headless-Chromium render (DOM + screenshot)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tracerl.generation import SamplingConfig, generate
from tracerl.models import load_model
from tracerl.report.trace_page import trace_payload, write_trace_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (scripts/test.sh installs it with apt-get where it can)",
)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    model = load_model("tiny-block")
    gens = generate(model, [model.tokenizer.encode("Trace <me> & </script>")],
                    SamplingConfig(max_new_tokens=14, strategy="dynamic", threshold=0.5, stop_token_ids=()))
    path = write_trace_html(tmp_path_factory.mktemp("trace") / "trace.html", model.tokenizer, gens,
                            title="a <title>")
    return path, gens[0], model.tokenizer


def embedded_data(html: str) -> dict:
    m = re.search(r'<script id="trace-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_page_embeds_the_trace_and_needs_no_network(page):
    path, gen, tok = page
    html = path.read_text(encoding="utf-8")
    data = embedded_data(html)["generations"][0]
    assert data["step_map"] == gen.step_map
    assert "".join(data["tokens"]) == tok.decode(gen.response_ids)
    assert data == trace_payload(tok, [gen])["generations"][0]
    assert "http://" not in html and "https://" not in html  # self-contained
    assert "a &lt;title&gt;" in html


def chromium(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="tracerl-chromium-")
    try:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@needs_chromium
@pytest.mark.slow
def test_page_replays_steps_in_headless_chromium(page, tmp_path):
    path, gen, _ = page
    for step in (0, 3, gen.nfe):
        out = chromium("--virtual-time-budget=2000", "--dump-dom", f"{path.as_uri()}#step={step}")
        assert out.returncode == 0, out.stderr[-2000:]
        dom = out.stdout
        visible = sum(1 for s in gen.step_map if s <= step)
        assert f'data-step="{step}"' in dom and f'data-visible="{visible}"' in dom, (step, dom[:400])
        assert dom.count('class="tok masked') + dom.count('class="tok new masked') == len(gen.step_map) - visible
    shot = tmp_path / "trace.png"
    out = chromium("--window-size=900,600", f"--screenshot={shot}", f"{path.as_uri()}#step=2")
    assert out.returncode == 0 and shot.stat().st_size > 5000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_trace_writes_the_page(tmp_path):
    html = tmp_path / "t.html"
    out = subprocess.run([sys.executable, "-m", "tracerl.cli", "trace", "--prompt", "Hi", "--max-new-tokens", "8",
                          "--html", str(html), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["html"]) == html and result["tokens"] == 8
    assert len(embedded_data(html.read_text())["generations"][0]["step_map"]) == 8
