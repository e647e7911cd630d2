"""A self-contained HTML page that replays the unmasking order of generations.

Each response token is shown masked until the step at which the sampler committed it; a slider
(and a play button) moves through the steps, and each token is coloured by its step.  The page
needs no network: data, style and script are inlined.  ``#step=N`` in the URL opens it at step N
(used by the headless-browser test).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from tracerl.files import write_text
from tracerl.generation.sampler import Generation

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>tracerl trace: __TITLE__</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
 .gen { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 1em; margin-bottom: 1.2em; }
 .prompt { color: #666; white-space: pre-wrap; font-family: monospace; margin-bottom: .6em; }
 .tokens { font-family: monospace; font-size: 15px; line-height: 1.9; white-space: pre-wrap; }
 .tok { border-radius: 3px; padding: 1px 0; }
 .tok.masked { background: #e4e4e4 !important; color: #999; }
 .tok.new { outline: 2px solid #222; }
 .controls { margin: .8em 0 1.2em; display: flex; gap: 1em; align-items: center; }
 input[type=range] { width: 420px; }
 .meta { color: #555; font-size: 13px; }
</style></head>
<body>
<h2>Decoding trace</h2>
<div class="controls">
  <button id="play">play</button>
  <input type="range" id="step" min="0" max="0" value="0">
  <span>step <b id="step-label">0</b> / <span id="step-max">0</span></span>
</div>
<div id="gens"></div>
<script id="trace-data" type="application/json">__DATA__</script>
<script>
(function () {
  const data = JSON.parse(document.getElementById("trace-data").textContent);
  const gens = document.getElementById("gens");
  let maxStep = 0;
  for (const g of data.generations) {
    const box = document.createElement("div");
    box.className = "gen";
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `${g.tokens.length} tokens, ${g.nfe} forwards, block ${g.block_size}, ${g.family}` +
      (g.label ? ` - ${g.label}` : "");
    const prompt = document.createElement("div");
    prompt.className = "prompt";
    prompt.textContent = g.prompt;
    const toks = document.createElement("div");
    toks.className = "tokens";
    const last = Math.max(1, ...g.step_map);
    g.tokens.forEach((t, i) => {
      const s = document.createElement("span");
      s.className = "tok";
      s.dataset.step = g.step_map[i];
      s.dataset.text = t.replace(/\\n/g, "\\u21B5\\n");  // keep line breaks visible
      s.title = `step ${g.step_map[i]}`;
      s.style.background = `hsl(${Math.round(240 * (g.step_map[i] - 1) / last)}, 70%, 85%)`;
      toks.appendChild(s);
      maxStep = Math.max(maxStep, g.step_map[i]);
    });
    box.append(meta, prompt, toks);
    gens.appendChild(box);
  }
  const slider = document.getElementById("step");
  slider.max = maxStep;
  document.getElementById("step-max").textContent = maxStep;
  function show(step) {
    slider.value = step;
    document.getElementById("step-label").textContent = step;
    for (const s of document.querySelectorAll(".tok")) {
      const k = Number(s.dataset.step);
      s.classList.toggle("masked", k > step);
      s.textContent = k > step ? "\u25A2" : s.dataset.text;
      s.classList.toggle("new", k === step);
    }
    document.body.dataset.step = step;
    document.body.dataset.visible = document.querySelectorAll(".tok:not(.masked)").length;
  }
  slider.addEventListener("input", () => show(Number(slider.value)));
  let timer = null;
  document.getElementById("play").addEventListener("click", () => {
    if (timer) { clearInterval(timer); timer = null; return; }
    let s = Number(slider.value) >= maxStep ? 0 : Number(slider.value);
    timer = setInterval(() => { show(s); if (++s > maxStep) { clearInterval(timer); timer = null; } }, 120);
  });
  const m = /step=(\\d+)/.exec(location.hash);
  show(m ? Math.min(Number(m[1]), maxStep) : maxStep);
})();
</script>
</body></html>
"""


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """One display string per token whose concatenation is the decoded text: a character split
    over several byte-level tokens is shown on the token that completes it."""
    pieces, start = [], 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[start : i + 1], skip_special_tokens=False)
        if text.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")  # incomplete UTF-8 sequence: wait for the next token
            continue
        pieces.append(text)
        start = i + 1
    return pieces


def trace_payload(tokenizer, generations: list[Generation], labels: list[str] | None = None) -> dict:
    items = []
    for i, g in enumerate(generations):
        items.append({
            "prompt": tokenizer.decode(g.prompt_ids, skip_special_tokens=False),
            "tokens": token_pieces(tokenizer, g.response_ids),
            "step_map": list(g.step_map),
            "nfe": g.nfe,
            "block_size": g.block_size,
            "family": g.family,
            "label": labels[i] if labels else "",
        })
    return {"generations": items}


def write_trace_html(
    path: str | Path, tokenizer, generations: list[Generation], *, title: str = "",
    labels: list[str] | None = None,
) -> Path:
    data = json.dumps(trace_payload(tokenizer, generations, labels), ensure_ascii=False)
    data = data.replace("</", "<\\/")  # a token "</script>" must not end the data block
    page = _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)
    return write_text(path, page)
