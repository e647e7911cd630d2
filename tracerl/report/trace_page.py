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
 .prompt { color: #555; white-space: pre-wrap; font-family: monospace; margin-bottom: .6em; }
 .prompt::before { content: "prompt  "; color: #999; font-family: system-ui, sans-serif; font-size: 12px; }
 .tokens { font-family: monospace; font-size: 15px; line-height: 2.1; white-space: pre-wrap; }
 .tok { border-radius: 3px; padding: 2px 1px; margin-right: 1px; }
 .tok.ws { color: #777; }
 .tok.special { border: 1px solid #666; font-size: 11px; font-style: italic; padding: 1px 3px; }
 .tok.masked { background: repeating-linear-gradient(45deg, #eee, #eee 3px, #d6d6d6 3px, #d6d6d6 6px) !important;
               color: #888; border: 1px dashed #999; font-style: normal; font-size: 11px; padding: 1px 3px; }
 .tok.new { outline: 2px solid #222; }
 .controls { margin: .8em 0 .6em; display: flex; gap: 1em; align-items: center; }
 input[type=range] { width: 420px; }
 .meta { color: #555; font-size: 13px; margin-bottom: .3em; }
 .outcome { font-size: 14px; margin-bottom: .4em; }
 .outcome .mark { font-weight: bold; font-size: 16px; }
 .outcome.correct .mark { color: #1a7f37; }
 .outcome.incorrect .mark { color: #c62828; }
 #legend { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; font-size: 12px; margin-bottom: 1.2em; }
 #legend .sw { display: inline-block; min-width: 1.6em; text-align: center; border-radius: 3px; padding: 1px 2px; }
 #legend .gradient { width: 260px; height: 14px; border-radius: 3px; display: inline-block; }
 #legend .key { margin-left: 1em; }
</style></head>
<body>
<h2>Decoding trace</h2>
<p class="meta">Each response token is shown masked until the forward pass (step) that committed it, and
coloured by that step; several tokens of one colour were committed by the same forward.  Drag the slider
or press play.  Spaces show as &middot;, line breaks as &crarr;, control characters as their symbols, special
tokens in a box.</p>
<div class="controls">
  <button id="play">play</button>
  <input type="range" id="step" min="0" max="0" value="0">
  <span>step <b id="step-label">0</b> / <span id="step-max">0</span></span>
</div>
<div id="legend"></div>
<div id="gens"></div>
<script id="trace-data" type="application/json">__DATA__</script>
<script>
(function () {
  const data = JSON.parse(document.getElementById("trace-data").textContent);
  const gens = document.getElementById("gens");
  const maxStep = Math.max(1, ...data.generations.map(g => Math.max(0, ...g.step_map)));
  const colour = s => `hsl(${Math.round(240 * (s - 1) / Math.max(1, maxStep - 1))}, 70%, 82%)`;
  const INVISIBLE = /[\\u0000-\\u001f\\u007f\\u00a0\\u200b-\\u200f\\u2028\\u2029\\ufeff]/g;
  function visible(t) {  // what a reader can see: whitespace and control characters as symbols
    return t.replace(/ /g, "\\u00b7").replace(INVISIBLE, c => {
      const code = c.charCodeAt(0);
      if (c === "\\n") return "\\u21b5\\n";
      if (c === "\\t") return "\\u2192";
      if (code < 0x20) return String.fromCharCode(0x2400 + code);  // the Control Pictures block
      if (code === 0x7f) return "\\u2421";
      return `<U+${code.toString(16).toUpperCase().padStart(4, "0")}>`;
    });
  }
  // Legend: one swatch per step (a gradient when there are too many to read).
  const legend = document.getElementById("legend");
  legend.append("step colour: ");
  if (maxStep <= 40) {
    for (let s = 1; s <= maxStep; s++) {
      const sw = document.createElement("span");
      sw.className = "sw step-swatch";
      sw.style.background = colour(s);
      sw.textContent = s;
      legend.appendChild(sw);
    }
  } else {
    const grad = document.createElement("span");
    grad.className = "gradient step-swatch";
    grad.style.background = `linear-gradient(to right, ${colour(1)}, ${colour(Math.ceil(maxStep / 2))}, ${colour(maxStep)})`;
    legend.append("1 ", grad, ` ${maxStep}`);
  }
  for (const [cls, text, label] of [["tok masked", "mask", "not yet decoded"], ["tok special", "<|endoftext|>", "special token"],
                                   ["tok ws", "\\u00b7", "space"]]) {
    const k = document.createElement("span");
    k.className = "key";
    const sw = document.createElement("span");
    sw.className = cls;
    sw.textContent = text;
    k.append(sw, ` ${label}`);
    legend.appendChild(k);
  }
  for (const g of data.generations) {
    const box = document.createElement("div");
    box.className = "gen";
    const meta = document.createElement("div");
    meta.className = "meta";
    const perForward = g.tokens.length / Math.max(1, g.nfe);
    meta.textContent = `${g.tokens.length} tokens in ${g.nfe} forwards (${perForward.toFixed(2)} per forward, ` +
      `up to ${g.max_parallel} at once), block size ${g.block_size}, ${g.family} family` + (g.label ? ` · ${g.label}` : "");
    box.appendChild(meta);
    if (g.outcome) {
      const o = document.createElement("div");
      o.className = "outcome " + (g.outcome.correct ? "correct" : "incorrect");
      o.dataset.correct = g.outcome.correct;
      const mark = document.createElement("span");
      mark.className = "mark";
      mark.textContent = g.outcome.correct ? "\\u2713 correct" : "\\u2717 incorrect";
      const answer = g.outcome.answer === null || g.outcome.answer === undefined ? "(none)" : g.outcome.answer;
      o.append(mark, `  gold answer: ${g.outcome.gold}  \\u00b7  model's answer: ${answer}`);
      box.appendChild(o);
    }
    const prompt = document.createElement("div");
    prompt.className = "prompt";
    prompt.textContent = g.prompt;
    const toks = document.createElement("div");
    toks.className = "tokens";
    g.tokens.forEach((t, i) => {
      const s = document.createElement("span");
      s.className = "tok" + (g.special[i] ? " special" : (t.length && !t.trim() ? " ws" : ""));
      s.dataset.step = g.step_map[i];
      s.dataset.text = g.special[i] ? t : visible(t);
      s.title = `step ${g.step_map[i]}` + (g.special[i] ? " (special token)" : "");
      s.style.background = colour(g.step_map[i]);
      toks.appendChild(s);
    });
    box.append(prompt, toks);
    gens.appendChild(box);
  }
  const slider = document.getElementById("step");
  slider.max = maxStep;
  document.getElementById("step-max").textContent = maxStep;
  function show(step) {
    slider.value = step;
    document.getElementById("step-label").textContent = step;
    for (const s of document.querySelectorAll("#gens .tok")) {
      const k = Number(s.dataset.step);
      s.classList.toggle("masked", k > step);
      s.textContent = k > step ? "mask" : s.dataset.text;
      s.classList.toggle("new", k === step);
    }
    document.body.dataset.step = step;
    document.body.dataset.visible = document.querySelectorAll("#gens .tok:not(.masked)").length;
  }
  slider.addEventListener("input", () => show(Number(slider.value)));
  let timer = null;
  document.getElementById("play").addEventListener("click", () => {
    if (timer) { clearInterval(timer); timer = null; return; }
    let s = Number(slider.value) >= maxStep ? 0 : Number(slider.value);
    timer = setInterval(() => { show(s); if (++s > maxStep) { clearInterval(timer); timer = null; } }, 250);
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


def trace_payload(tokenizer, generations: list[Generation], labels: list[str] | None = None,
                  outcomes: list[dict | None] | None = None) -> dict:
    """The page's data: per generation its prompt, response token pieces (``special`` marks special
    tokens), step map, NFE and, where given, a label and an outcome ``{gold, answer, correct}``."""
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    items = []
    for i, g in enumerate(generations):
        per_step: dict[int, int] = {}
        for step in g.step_map:
            per_step[step] = per_step.get(step, 0) + 1
        items.append({
            "prompt": tokenizer.decode(g.prompt_ids, skip_special_tokens=False),
            "tokens": token_pieces(tokenizer, g.response_ids),
            "special": [t in special_ids for t in g.response_ids],
            "step_map": list(g.step_map),
            "max_parallel": max(per_step.values(), default=0),
            "nfe": g.nfe,
            "block_size": g.block_size,
            "family": g.family,
            "label": labels[i] if labels else "",
            "outcome": outcomes[i] if outcomes else None,
        })
    return {"generations": items}


def write_trace_html(
    path: str | Path, tokenizer, generations: list[Generation], *, title: str = "",
    labels: list[str] | None = None, outcomes: list[dict | None] | None = None,
) -> Path:
    """``outcomes[i]`` = ``{"gold": ..., "answer": ..., "correct": bool}`` shows the gold answer, the
    model's extracted answer and a correct/incorrect mark above generation i."""
    data = json.dumps(trace_payload(tokenizer, generations, labels, outcomes), ensure_ascii=False)
    data = data.replace("</", "<\\/")  # a token "</script>" must not end the data block
    page = _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)
    return write_text(path, page)
