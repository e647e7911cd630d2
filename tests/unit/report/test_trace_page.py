"""The trace-viewer page: data correctness, and a real headless-Chromium render (DOM + screenshot)."""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
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
    """A real dynamic-decoding generation, and one made to hold what a reader must still see: a
    space, a line break, a control byte, a special token, with a wrong answer against its gold."""
    model = load_model("tiny-block")
    gens = generate(model, [model.tokenizer.encode("Trace <me> & </script>")],
                    SamplingConfig(max_new_tokens=14, strategy="dynamic", threshold=0.5, stop_token_ids=()))
    crafted = replace(gens[0], response_ids=[32, 10, 1, 97, 256], step_map=[1, 1, 2, 2, 3], nfe=3)
    path = write_trace_html(tmp_path_factory.mktemp("trace") / "trace.html", model.tokenizer, [gens[0], crafted],
                            title="a <title>", outcomes=[{"gold": "12", "answer": "12", "correct": True},
                                                         {"gold": "7", "answer": None, "correct": False}])
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
    assert data == trace_payload(tok, [gen], outcomes=[{"gold": "12", "answer": "12", "correct": True}])["generations"][0]
    crafted = embedded_data(html)["generations"][1]
    assert crafted["tokens"] == [" ", "\n", "\x01", "a", "<|endoftext|>"]
    assert crafted["special"] == [False, False, False, False, True] and crafted["max_parallel"] == 2
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


def response_spans(dom: str) -> list[tuple[str, str]]:
    """(class, text) of every response-token span of the rendered page (legend swatches have no step)."""
    return [(m.group(1), html_lib.unescape(m.group(2)))
            for m in re.finditer(r'<span class="([^"]*)" data-step="\d+"[^>]*>(.*?)</span>', dom, re.S)]


@needs_chromium
@pytest.mark.slow
def test_page_replays_steps_in_headless_chromium(page, tmp_path):
    path, gen, _ = page
    total = len(gen.step_map) + 5
    last = max(max(gen.step_map), 3)
    for step in (0, 2, last):
        out = chromium("--virtual-time-budget=2000", "--dump-dom", f"{path.as_uri()}#step={step}")
        assert out.returncode == 0, out.stderr[-2000:]
        dom = out.stdout
        visible = sum(1 for s in gen.step_map if s <= step) + sum(1 for s in (1, 1, 2, 2, 3) if s <= step)
        assert f'data-step="{step}"' in dom and f'data-visible="{visible}"' in dom, (step, dom[:400])
        spans = response_spans(dom)
        assert len(spans) == total
        masked = [(c, t) for c, t in spans if "masked" in c.split()]
        assert len(masked) == total - visible and all(t == "mask" for _, t in masked)  # distinct mask cells
    # Fully decoded: whitespace, the control byte and the special token are visible.
    crafted = spans[len(gen.step_map):]
    assert [t for _, t in crafted] == ["\u00b7", "\u21b5\n", "\u2401", "a", "<|endoftext|>"]
    assert "ws" in crafted[0][0].split() and "special" in crafted[4][0].split()
    # The legend names every step's colour; each answer has its mark.
    assert len(re.findall(r'class="sw step-swatch"', dom)) == last
    assert dom.count('data-correct="true"') == 1 and dom.count('data-correct="false"') == 1
    assert "\u2713 correct" in dom and "\u2717 incorrect" in dom and "gold answer: 7" in dom
    shot = tmp_path / "trace.png"
    out = chromium("--window-size=1000,700", f"--screenshot={shot}", f"{path.as_uri()}#step=2")
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


def test_cli_trace_marks_the_answer_against_the_gold_one(tmp_path):
    html = tmp_path / "t.html"
    out = subprocess.run([sys.executable, "-m", "tracerl.cli", "trace", "--prompt", "Hi", "--max-new-tokens", "8",
                          "--answer", "42", "--html", str(html), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["correct"] is False  # random weights do not say 42
    outcome = embedded_data(html.read_text())["generations"][0]["outcome"]
    assert outcome["gold"] == "42" and outcome["correct"] is False
