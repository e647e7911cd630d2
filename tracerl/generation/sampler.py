"""The sampler core: batched block-wise diffusion decoding for every family.

Layout.  Prompts of different lengths share one column layout in which every row's blocks start
at the same columns: row r is left-padded by a multiple of the block size, chosen so that each
row's first denoising block (the block holding its first generated position, possibly with the
prompt's tail, as in upstream) sits at the same column block.  Blocks therefore follow absolute
token positions in every row, all rows denoise the same columns at the same time, and batching
never changes a row's attention pattern (batched == one-by-one decoding).

A row's canvas ends at ``prompt + max_new_tokens`` (or the model's context): columns past it
are invalid, so the last block may be partial and nothing past the limit is ever decoded.

Trace.  Each row counts its own denoising forwards (a forward counts for a row only if the row
still had masked positions in the block).  A token unmasked in the row's n-th forward gets step
``n`` in the step map (1-based, global across blocks), so step maps and ``nfe`` do not depend on
what else is in the batch.

Random streams.  Sampling (temperature > 0) and the ``random`` rule draw from one
``torch.Generator`` per row, seeded with the row's seed (see ``generate``).  Row r draws only on
forwards in which it is active (still has masked positions in the current block), in the order
of its own forwards: each such forward draws b*V Exp(1) variates for the row's tokens
(temperature > 0: an exponential race on its (b, V) sampling distribution, the algorithm of
``torch.multinomial``; ``sampling._sample_per_row``), then b U[0, 1) variates for the ``random``
rule.  A row's output is therefore a function of the model, its prompt, its seed and the config
only, whatever shares its batch.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field

import torch

from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig
from tracerl.generation.decoders import make_decoder
from tracerl.generation.sampling import draw
from tracerl.generation.seeds import check_seed_value, derive_seed
from tracerl.generation.stops import stop_string_end
from tracerl.generation.unmasking import select, step_quota
from tracerl.models.model import DiffusionLM

STOP_TOKEN_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")


@dataclass
class Generation:
    """One generated response and its decoding trace."""

    prompt_ids: list[int]
    response_ids: list[int]  # through the stop token (or the token completing a stop string)
    text: str  # the response decoded, special tokens (the stop token) skipped; raw_text keeps them
    step_map: list[int]  # per response token: the row's 1-based forward that unmasked it
    nfe: int  # denoising forwards this row took part in
    finish_reason: str  # "stop" | "length"
    block_size: int
    family: str
    logprobs: list[float] | None = None  # log-prob of each token under the sampling distribution
    confidences: list[float] | None = None
    # The canvas after the stop token as the sampler saw it while decoding the response: the
    # tokens it decoded after the stop in the same block (with their steps) and, with full
    # attention, the never-decoded masked positions up to the canvas end (step 0). Not part of
    # the response; TraceRL rows keep it as context so training states equal sampling states.
    tail_ids: list[int] = field(default_factory=list)
    tail_steps: list[int] = field(default_factory=list)
    raw_text: str = ""  # every response token decoded, special ones included (what stop strings see)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    seconds: float = 0.0
    forward_seconds: float = 0.0
    forwards: int = 0  # batched forward calls
    new_tokens: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class Canvas:
    tokens: torch.Tensor  # (B, C)
    valid: torch.Tensor  # (B, C) False for left padding and columns past the row's limit
    positions: torch.Tensor  # (B, C) absolute token positions
    masked: torch.Tensor  # (B, C) still to decode
    gen_start: torch.Tensor  # (B,) first generated column
    gen_end: torch.Tensor  # (B,) one past the last column this row may generate
    first_block: int  # column index of the first denoising block's start


def default_stop_ids(model: DiffusionLM) -> tuple[int, ...]:
    tok = model.tokenizer
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    vocab = tok.get_vocab()
    ids.update(int(vocab[name]) for name in STOP_TOKEN_NAMES if name in vocab)
    ids.discard(model.mask_token_id)
    return tuple(sorted(ids))


def build_canvas(
    prompts: list[list[int]], block_size: int, max_new_tokens: int, *, mask_id: int, pad_id: int,
    max_positions: int, device: torch.device,
) -> Canvas:
    b = block_size
    lengths = [len(p) for p in prompts]
    first_k = max(n // b for n in lengths)
    offsets = [b * (first_k - n // b) for n in lengths]
    limits = [min(max_new_tokens, max_positions - n) for n in lengths]
    ends = [o + n + lim for o, n, lim in zip(offsets, lengths, limits)]
    columns = -(-max(ends) // b) * b
    batch = len(prompts)
    tokens = torch.full((batch, columns), pad_id, dtype=torch.long)
    valid = torch.zeros(batch, columns, dtype=torch.bool)
    positions = torch.zeros(batch, columns, dtype=torch.long)
    masked = torch.zeros(batch, columns, dtype=torch.bool)
    for r, (prompt, off, end) in enumerate(zip(prompts, offsets, ends)):
        start = off + len(prompt)
        tokens[r, off:start] = torch.tensor(prompt, dtype=torch.long)
        tokens[r, start:end] = mask_id
        masked[r, start:end] = True
        valid[r, off:end] = True
        positions[r, off:end] = torch.arange(end - off)
    gen_start = torch.tensor([o + n for o, n in zip(offsets, lengths)])
    return Canvas(
        tokens.to(device), valid.to(device), positions.to(device), masked.to(device),
        gen_start.to(device), torch.tensor(ends, device=device), first_k * b,
    )


def encode_prompts(prompts, model: DiffusionLM) -> list[list[int]]:
    """Token ids of each prompt: a list of token ids as it is, a string encoded without special
    tokens, a conversation (a list of ``{"role", "content"}`` dicts) rendered by the tokenizer's
    chat template with the generation prompt."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise ConfigError(f"prompts: must be a list of prompts (token-id lists, strings or conversations), "
                          f"got {type(prompts).__name__}")
    tok = model.tokenizer
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ConfigError(f"prompt {i}: empty prompt")
            p = tok.encode(p, add_special_tokens=False)
        elif isinstance(p, (list, tuple)) and p and all(isinstance(m, dict) for m in p):
            if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in p):
                raise ConfigError(f"prompt {i}: a conversation is a list of {{'role': str, 'content': str}} dicts")
            if not getattr(tok, "chat_template", None):
                raise ConfigError(f"prompt {i}: a conversation needs a tokenizer with a chat template")
            p = tok.encode(tok.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)
        elif isinstance(p, (list, tuple)) or hasattr(p, "tolist"):
            for t in p:
                if isinstance(t, (str, bytes, bool, float)):
                    raise ConfigError(f"prompt {i}: token ids must be integers, got {t!r} (pass text as a string)")
        else:
            raise ConfigError(f"prompt {i}: must be token ids, a string or a conversation, got {type(p).__name__}")
        out.append(p)
    return out


def check_prompts(prompts: list[list[int]], model: DiffusionLM) -> None:
    if not prompts:
        raise ConfigError("prompts: empty list")
    vocab = model.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i}: empty prompt")
        if len(p) >= model.max_positions:
            raise ConfigError(
                f"prompt {i}: {len(p)} tokens, but the model's context is {model.max_positions} "
                "(max_position_embeddings); shorten the prompt"
            )
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise ConfigError(f"prompt {i}: token id {bad[0]} outside the vocabulary (0..{vocab - 1})")


def _row_seeds(seeds: list[int] | None, base: int | None, n: int) -> list[int]:
    """One seed per prompt (the rule is in ``generate``'s docstring)."""
    if seeds is None:
        if base is None:
            return [secrets.randbits(63) for _ in range(n)]
        return [derive_seed(base, i) for i in range(n)]
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
        raise ConfigError(f"seeds: must be a list of {n} integers (one per prompt), got {seeds!r}")
    if len(seeds) != n:
        raise ConfigError(f"seeds: {len(seeds)} seeds for {n} prompts; pass one seed per prompt")
    return [check_seed_value(v, f"seeds[{i}]") for i, v in enumerate(seeds)]


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompts: list[list[int]] | list[str] | list[list[dict]],
    config: SamplingConfig | None = None,
    *,
    seeds: list[int] | None = None,
    stats: GenerationStats | None = None,
) -> list[Generation]:
    """Decode a batch of prompts; returns one ``Generation`` per prompt, in order.  A prompt is
    token ids, a string or a conversation (``encode_prompts``).

    Seeds.  Prompt i gets its own random stream, a ``torch.Generator`` seeded with its seed:
    ``seeds[i]`` if ``seeds`` is given (one integer in [0, 2**64) per prompt); else
    ``derive_seed(config.seed, i)`` if ``config.seed`` is set; else a fresh random seed
    (nondeterministic).  A response depends only on the model, its prompt, its seed and
    ``config``, never on the other prompts of the call or its position among them; pass
    ``seeds=`` for request identities that do not depend on the call.  Greedy decoding
    (temperature 0, any rule but ``random``) draws nothing and ignores the seeds.

    Stops.  When a block is final, a row ends at its first stop token or, if earlier, at the
    token completing a stop string of ``config.stop`` (``tracerl.generation.stops``).
    """
    config = config or SamplingConfig()
    config.validate()
    prompts = encode_prompts(prompts, model)
    check_prompts(prompts, model)
    randomized = config.temperature > 0 or config.strategy == "random"
    if seeds is not None or randomized:
        seeds = _row_seeds(seeds, config.seed, len(prompts))
    t_start = time.perf_counter()
    device = model.device
    b = config.block_size or model.block_size
    steps = config.steps or b
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    stop_ids = torch.tensor(
        config.stop_token_ids if config.stop_token_ids is not None else default_stop_ids(model),
        dtype=torch.long, device=device,
    )
    banned = torch.tensor(model.unsampleable_ids, dtype=torch.long, device=device)
    generators = None
    if randomized:
        generators = [torch.Generator(device=device) for _ in seeds]
        for g, seed in zip(generators, seeds):
            g.manual_seed(seed)

    canvas = build_canvas(
        [list(map(int, p)) for p in prompts], b, config.max_new_tokens, mask_id=model.mask_token_id,
        pad_id=pad_id, max_positions=model.max_positions, device=device,
    )
    decoder = make_decoder(model, canvas, b, config.use_cache, config.full_cache)
    batch, columns = canvas.tokens.shape
    step_map = torch.zeros(batch, columns, dtype=torch.long, device=device)
    logprob = torch.zeros(batch, columns, device=device)
    confidence = torch.zeros(batch, columns, device=device)
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    finished_at = torch.full((batch,), -1, dtype=torch.long, device=device)  # stop column

    for s in range(canvas.first_block, columns, b):
        e = s + b
        masked = canvas.masked[:, s:e].clone()
        at_start = masked.sum(-1)
        step = torch.zeros(batch, dtype=torch.long, device=device)
        while masked.any():
            active = masked.any(-1)
            streams = None  # rows draw only on their own forwards
            if generators is not None:
                streams = [g if a else None for g, a in zip(generators, active.tolist())]
            d = draw(decoder.logits(s, e), temperature=config.temperature, top_k=config.top_k,
                     top_p=config.top_p, banned_ids=banned, generator=streams)
            chosen = select(
                config.strategy, d, masked, step_quota(at_start, step, steps),
                threshold=config.threshold, eb_threshold=config.eb_threshold, generator=streams,
            )
            nfe += active.long()
            step += active.long()
            canvas.tokens[:, s:e] = torch.where(chosen, d.tokens, canvas.tokens[:, s:e])
            step_map[:, s:e] = torch.where(chosen, nfe[:, None], step_map[:, s:e])
            logprob[:, s:e] = torch.where(chosen, d.logprob, logprob[:, s:e])
            confidence[:, s:e] = torch.where(chosen, d.confidence, confidence[:, s:e])
            masked &= ~chosen
        canvas.masked[:, s:e] = False
        if config.stop:
            _finish_rows_at_stop_strings(canvas, s, e, stop_ids, finished_at, pad_id, config.stop,
                                         lambda ids: tok.decode(ids, skip_special_tokens=False))
        _finish_stopped_rows(canvas, s, e, stop_ids, finished_at, pad_id)
        if not canvas.masked[:, e:].any():
            break

    results = _collect(model, canvas, step_map, logprob, confidence, nfe, finished_at, prompts, b,
                       config.return_logprobs)
    if stats is not None:
        stats.seconds += time.perf_counter() - t_start
        stats.forward_seconds += decoder.timer.seconds
        stats.forwards += decoder.timer.forwards
        stats.new_tokens += sum(len(r.response_ids) for r in results)
    return results


def _finish_stopped_rows(
    canvas: Canvas, s: int, e: int, stop_ids: torch.Tensor, finished_at: torch.Tensor, pad_id: int
) -> None:
    """After a block is final: rows whose generated tokens in it hold a stop token are done."""
    cols = torch.arange(s, e, device=canvas.tokens.device)
    generated = (cols[None, :] >= canvas.gen_start[:, None]) & (cols[None, :] < canvas.gen_end[:, None])
    is_stop = torch.isin(canvas.tokens[:, s:e], stop_ids) & generated & (finished_at[:, None] < 0)
    hit = is_stop.any(-1)
    if hit.any():
        first = torch.where(is_stop, cols[None, :], torch.full_like(is_stop, e, dtype=torch.long)).min(-1).values
        finished_at[hit] = first[hit]
        rows = hit.nonzero().squeeze(-1)
        canvas.masked[rows, e:] = False  # nothing more to decode for these rows
        canvas.tokens[rows, e:] = pad_id


def _finish_rows_at_stop_strings(
    canvas: Canvas, s: int, e: int, stop_ids: torch.Tensor, finished_at: torch.Tensor, pad_id: int,
    stops: tuple[str, ...], decode,
) -> None:
    """After a block is final, before ``_finish_stopped_rows``: a row whose response so far
    contains a stop string ends at the token completing it, if that comes before the block's
    first stop token (the earlier stop wins; the text checked excludes the stop token)."""
    open_rows = ((finished_at < 0) & (canvas.gen_end > s)).nonzero().squeeze(-1).tolist()
    if not open_rows:
        return
    starts, ends = canvas.gen_start.tolist(), canvas.gen_end.tolist()
    stop_set = set(stop_ids.tolist())
    rows = []
    for r, row in zip(open_rows, canvas.tokens[open_rows, :e].tolist()):
        lo, hi = max(s, starts[r]), min(e, ends[r])  # the row's generated columns in the block
        cut = next((c for c in range(lo, hi) if row[c] in stop_set), hi)
        found = stop_string_end(row[starts[r]:cut], decode, stops, start=lo - starts[r])
        if found is not None:
            finished_at[r] = starts[r] + found[0] - 1
            rows.append(r)
    if rows:
        rows = torch.tensor(rows, device=canvas.tokens.device)
        canvas.masked[rows, e:] = False  # nothing more to decode for these rows
        canvas.tokens[rows, e:] = pad_id


def _collect(model, canvas, step_map, logprob, confidence, nfe, finished_at, prompts, b, with_logprobs):
    tokens = canvas.tokens.tolist()
    steps = step_map.tolist()
    lps = logprob.tolist() if with_logprobs else None
    confs = confidence.tolist() if with_logprobs else None
    out = []
    for r, prompt in enumerate(prompts):
        start = int(canvas.gen_start[r])
        stop = int(finished_at[r])
        end = stop + 1 if stop >= 0 else int(canvas.gen_end[r])
        response = tokens[r][start:end]
        tail_ids, tail_steps = [], []
        if stop >= 0:
            block_end = min(canvas.first_block + ((stop - canvas.first_block) // b + 1) * b,
                            int(canvas.gen_end[r]))
            tail_ids, tail_steps = tokens[r][end:block_end], steps[r][end:block_end]
            if model.spec.attention == "full":  # later blocks were visible, all masked
                never = int(canvas.gen_end[r]) - block_end
                tail_ids = tail_ids + [model.mask_token_id] * never
                tail_steps = tail_steps + [0] * never
        out.append(Generation(
            prompt_ids=list(map(int, prompt)),
            response_ids=response,
            text=model.tokenizer.decode(response, skip_special_tokens=True),
            raw_text=model.tokenizer.decode(response, skip_special_tokens=False),
            step_map=steps[r][start:end],
            nfe=int(nfe[r]),
            finish_reason="stop" if stop >= 0 else "length",
            block_size=b,
            family=model.family,
            logprobs=lps[r][start:end] if lps else None,
            confidences=confs[r][start:end] if confs else None,
            tail_ids=tail_ids,
            tail_steps=tail_steps,
        ))
    return out
