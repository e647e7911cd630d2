"""Foreign checkpoint layouts (SDAR/TraDo, LLaDA, Dream): detection, weight mapping against
independent references, round trips through our own format, load errors, and the convert CLI.

The checkpoints are tiny random-weight copies of the upstream layouts written by
``tests/support/foreign_checkpoints.py``; each is written once per module and copied before a test
modifies it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.support.foreign_checkpoints import (
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    LAYERS,
    llada_reference_logits,
    write_dream_checkpoint,
    write_llada_checkpoint,
    write_sdar_checkpoint,
)

from tracerl import masks  # noqa: E402
from tracerl.errors import CheckpointError  # noqa: E402
from tracerl.models import load_model  # noqa: E402

WRITERS = {
    "sdar": write_sdar_checkpoint,
    "llada": write_llada_checkpoint,
    "dream": write_dream_checkpoint,
}
LAYOUT_NAMES = list(WRITERS)
# Expected (family, attention, mask id, block size, backbone model_type) of each layout.
EXPECTED = {
    "sdar": ("block", "block", 151669, 4, "qwen3"),
    "llada": ("full", "full", 126336, None, "llama"),
    "dream": ("shifted", "full", 151666, None, "qwen2"),
}
ATOL = 1e-5
# LLaDA vs the naive reference: max |diff| <= 1e-4 * max(1, max |reference logit|).  Both are
# float32; the two differ only in summation order (SDPA vs explicit softmax), ~1e-6 in practice.
LLADA_RTOL = 1e-4
LENGTH = 12


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only add contention (10-100x slower on a busy
    machine), so run this module single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each upstream layout written once: name -> info dict of the writer (folder, state_dict...)."""
    root = tmp_path_factory.mktemp("foreign")
    return {name: write(root / name, seed=0) for name, write in WRITERS.items()}


@pytest.fixture(scope="module")
def loaded(written):
    return {name: load_model(info["folder"]) for name, info in written.items()}


@pytest.fixture(scope="module")
def saved(loaded, tmp_path_factory):
    """Each loaded layout saved once in our format: name -> folder."""
    root = tmp_path_factory.mktemp("saved")
    return {name: model.save_pretrained(root / name) for name, model in loaded.items()}


@pytest.fixture(scope="module")
def reloaded(saved):
    return {name: load_model(folder) for name, folder in saved.items()}


def copy_of(written, name, tmp_path) -> Path:
    """A private copy of a written checkpoint folder (tests that break it work on the copy)."""
    return Path(shutil.copytree(written[name]["folder"], tmp_path / name))


# --- helpers -----------------------------------------------------------------------------------


def token_ids(batch=2, length=LENGTH, seed=0, high=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, length), generator=g)


def positions_for(ids):
    return torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)


def run(model, ids, mask, positions=None):
    positions = positions_for(ids) if positions is None else positions
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions)


def own_mask_logits(model, ids):
    """Logits under the model's own attention kind (block-causal or full), no padding."""
    positions = positions_for(ids)
    valid = torch.ones_like(ids, dtype=torch.bool)
    return run(model, ids, model.attention_mask(positions, valid), positions)


def full_mask_for(ids):
    return masks.full_mask(ids.shape[1], torch.ones_like(ids, dtype=torch.bool))


def rewrite_weights(folder: Path, edit) -> None:
    """Load model.safetensors, let ``edit`` change the dict in place, write it back."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def load_error(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    return str(info.value)


# --- 1. detection ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_layout_is_detected_with_its_diffusion_settings(name, written, loaded):
    family, attention, mask_id, block_size, backbone_type = EXPECTED[name]
    info, model = written[name], loaded[name]
    assert info["mask_token_id"] == mask_id  # the fixture and this test agree on the real ids
    spec = model.spec
    assert spec.family == family == info["family"]
    assert spec.attention == attention
    assert spec.mask_token_id == mask_id
    assert spec.source_layout == name
    if block_size is not None:
        assert spec.block_size == block_size
    assert model.backbone.config.model_type == backbone_type
    # The tokenizer knows the mask token, at that id, and it round-trips through the vocabulary.
    tok = model.tokenizer
    assert tok.mask_token == info["mask_token"]
    assert tok.mask_token_id == mask_id
    assert tok.convert_tokens_to_ids(info["mask_token"]) == mask_id
    assert tok.convert_ids_to_tokens(mask_id) == info["mask_token"]
    assert mask_id not in (tok.eos_token_id, tok.pad_token_id)


def test_sdar_block_size_comes_from_its_config(written, tmp_path):
    folder = copy_of(written, "sdar", tmp_path)
    edit_json(folder / "config.json", lambda d: d.update(block_size=8))
    assert load_model(folder).spec.block_size == 8


def test_llada_mask_token_is_set_on_the_tokenizer_that_lacked_it(written, loaded):
    # Upstream LLaDA's tokenizer declares no mask_token (the id lives in config.json).
    saved_config = json.loads((written["llada"]["folder"] / "tokenizer_config.json").read_text())
    assert saved_config.get("mask_token") is None
    assert loaded["llada"].tokenizer.mask_token == "<|mdm_mask|>"


# --- 2. weight mapping against independent references ------------------------------------------


def test_sdar_causal_logits_equal_stock_qwen3(written, loaded):
    info = written["sdar"]
    cfg = info["config"]
    reference_config = Qwen3Config(
        vocab_size=info["num_embeddings"],
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attention_bias=False,
        tie_word_embeddings=False,
    )
    reference = Qwen3ForCausalLM(reference_config).eval()
    reference.load_state_dict(info["state_dict"], strict=True)

    ids = token_ids()
    positions = positions_for(ids)
    ours = run(loaded["sdar"], ids, masks.causal_mask(positions), positions)
    with torch.no_grad():
        expected = reference(ids).logits  # its own built-in causal attention
    assert ours.shape == expected.shape == (2, LENGTH, info["num_embeddings"])
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_sdar_block_causal_attention_hides_later_blocks(loaded):
    model = loaded["sdar"]
    b = model.spec.block_size
    assert LENGTH == 3 * b
    ids = token_ids(batch=1)
    changed = ids.clone()
    changed[0, 2 * b + 1] = (changed[0, 2 * b + 1] + 1) % 256  # a token of the third block
    before, after = own_mask_logits(model, ids), own_mask_logits(model, changed)
    # Blocks 0 and 1 cannot see block 2 ...
    torch.testing.assert_close(after[:, : 2 * b], before[:, : 2 * b], atol=0, rtol=0)
    # ... while every position of block 2 sees the whole block (bidirectional inside a block),
    # including the position before the changed token.
    for j in range(2 * b, 3 * b):
        assert (after[0, j] - before[0, j]).abs().max() > 1e-4, j


def test_llada_full_attention_logits_equal_the_naive_reference(written, loaded):
    info = written["llada"]
    ids = token_ids(high=info["num_embeddings"])
    ours = run(loaded["llada"], ids, full_mask_for(ids))
    expected = llada_reference_logits(info["state_dict"], info["config"], ids)
    assert ours.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    diff = (ours - expected).abs().max().item()
    assert diff <= LLADA_RTOL * scale, f"max |diff| {diff:.3g} vs scale {scale:.3g}"


def test_llada_own_mask_is_bidirectional(loaded):
    model = loaded["llada"]
    ids = token_ids(batch=1)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    first_before = own_mask_logits(model, ids)[0, 0]
    first_after = own_mask_logits(model, changed)[0, 0]
    assert (first_after - first_before).abs().max() > 1e-4  # position 0 sees the last token


def test_dream_full_attention_logits_equal_stock_qwen2(written, loaded):
    info = written["dream"]
    reference_config = Qwen2Config(
        vocab_size=info["num_embeddings"],
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=info["config"]["max_position_embeddings"],
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        tie_word_embeddings=False,
    )
    reference = Qwen2ForCausalLM(reference_config).eval()
    reference.load_state_dict(info["state_dict"], strict=True)  # q/k/v biases included

    ids = token_ids()
    positions = positions_for(ids)
    full = full_mask_for(ids)
    ours = run(loaded["dream"], ids, full, positions)
    with torch.no_grad():
        expected = reference(ids, attention_mask=full, position_ids=positions).logits
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # Dream's own attention is the full one: the same logits without passing a mask by hand ...
    torch.testing.assert_close(own_mask_logits(loaded["dream"], ids), ours, atol=0, rtol=0)
    # ... and it really is bidirectional (a causal forward gives different early logits).
    causal = run(loaded["dream"], ids, masks.causal_mask(positions), positions)
    assert (causal[:, 0] - ours[:, 0]).abs().max() > 1e-4


# --- 3. round trips through our format ---------------------------------------------------------


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_round_trip_keeps_logits_and_spec(name, loaded, reloaded):
    before, after = loaded[name], reloaded[name]
    assert after.spec == before.spec
    assert after.spec.source_layout == name
    assert after.spec.mask_token_id == EXPECTED[name][2]
    assert after.spec.family == EXPECTED[name][0]
    ids = token_ids(seed=1)
    torch.testing.assert_close(own_mask_logits(after, ids), own_mask_logits(before, ids), atol=0, rtol=0)
    assert after.tokenizer.mask_token_id == EXPECTED[name][2]


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_saved_config_is_a_stock_backbone_with_a_tracerl_section(name, saved, loaded):
    data = json.loads((saved[name] / "config.json").read_text())
    assert data["model_type"] == EXPECTED[name][4]
    assert data["tracerl"]["mask_token_id"] == EXPECTED[name][2]
    assert data["tracerl"]["family"] == EXPECTED[name][0]
    assert data["tracerl"]["source_layout"] == name
    assert data["tracerl"] == loaded[name].spec.to_dict()


# Upstream LLaDA name (inside model.transformer.blocks.N) -> Llama name (inside model.layers.N),
# written out here independently of tracerl's layouts.py.
LLADA_TO_LLAMA = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}


def llama_name(upstream: str) -> str:
    top = {
        "model.transformer.wte.weight": "model.embed_tokens.weight",
        "model.transformer.ln_f.weight": "model.norm.weight",
        "model.transformer.ff_out.weight": "lm_head.weight",
    }
    if upstream in top:
        return top[upstream]
    parts = upstream.split(".")  # model.transformer.blocks.N.<module>.weight
    assert parts[:3] == ["model", "transformer", "blocks"], upstream
    return f"model.layers.{parts[3]}.{LLADA_TO_LLAMA[parts[4]]}.{parts[5]}"


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_saved_folder_is_read_by_stock_transformers(name, written, saved):
    hf = AutoModelForCausalLM.from_pretrained(str(saved[name]), dtype=torch.float32)
    assert hf.config.model_type == EXPECTED[name][4]
    upstream = written[name]["state_dict"]
    got = hf.state_dict()
    if name == "llada":
        # The example of the brief, then every tensor through the independent name table.
        torch.testing.assert_close(
            got["model.layers.0.mlp.gate_proj.weight"],
            upstream["model.transformer.blocks.0.ff_proj.weight"], atol=0, rtol=0)
        expected = {llama_name(k): v for k, v in upstream.items()}
    else:
        expected = dict(upstream)  # SDAR and Dream already use the Qwen3 / Qwen2 names
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, atol=0, rtol=0, msg=key)

    tok = AutoTokenizer.from_pretrained(str(saved[name]))
    mask_id = EXPECTED[name][2]
    assert tok.mask_token_id == mask_id
    assert tok.convert_ids_to_tokens(mask_id) == written[name]["mask_token"]


# --- 4. bad input ------------------------------------------------------------------------------


def test_llada_missing_block_tensor_is_reported(written, tmp_path):
    folder = copy_of(written, "llada", tmp_path)
    rewrite_weights(folder, lambda t: t.pop("model.transformer.blocks.1.ff_norm.weight"))
    msg = load_error(folder)
    assert "model.safetensors" in msg
    assert "missing" in msg
    assert "llada" in msg


def test_llada_missing_tensor_is_named_as_in_the_checkpoint(written, tmp_path):
    folder = copy_of(written, "llada", tmp_path)
    rewrite_weights(folder, lambda t: t.pop("model.transformer.blocks.1.ff_norm.weight"))
    assert "model.transformer.blocks.1.ff_norm.weight" in load_error(folder)


def test_llada_unknown_tensor_is_reported(written, tmp_path):
    folder = copy_of(written, "llada", tmp_path)
    rewrite_weights(folder, lambda t: t.update(
        {"model.transformer.blocks.0.mystery.weight": torch.zeros(4, 4)}))
    msg = load_error(folder)
    assert "model.safetensors" in msg
    assert "model.transformer.blocks.0.mystery.weight" in msg
    assert "not used" in msg


def test_sdar_tensor_of_the_wrong_shape_is_reported(written, tmp_path):
    folder = copy_of(written, "sdar", tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_weights(folder, lambda t: t.update({name: torch.zeros(INTERMEDIATE + 1, HIDDEN)}))
    msg = load_error(folder)
    assert "model.safetensors" in msg
    assert name in msg
    assert f"({INTERMEDIATE + 1}, {HIDDEN})" in msg
    assert f"({INTERMEDIATE}, {HIDDEN})" in msg


def _drop_dream_mask_token(folder: Path) -> None:
    """Make <|mask|> (151666) an anonymous reserved token and undeclare the mask token."""
    reserved = "<|reserved_151666|>"
    tok_json = folder / "tokenizer.json"
    data = json.loads(tok_json.read_text())
    for entry in data["added_tokens"]:
        if entry["content"] == "<|mask|>":
            entry["content"] = reserved
    vocab = data["model"]["vocab"]
    vocab[reserved] = vocab.pop("<|mask|>")
    tok_json.write_text(json.dumps(data))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            edit_json(path, lambda d: d.pop("mask_token", None))
            text = path.read_text()
            assert "<|mask|>" not in text, (name, text[:2000])


def test_dream_without_any_mask_token_is_an_error(written, tmp_path):
    folder = copy_of(written, "dream", tmp_path)
    _drop_dream_mask_token(folder)
    edit_json(folder / "config.json", lambda d: d.pop("mask_token_id"))
    msg = load_error(folder)
    assert "no mask token" in msg
    assert str(folder) in msg
    assert "mask_token_id" in msg


def test_dream_mask_id_from_config_alone_is_enough(written, tmp_path):
    # The control of the test above: the tokenizer change alone still loads, from config.json.
    folder = copy_of(written, "dream", tmp_path)
    _drop_dream_mask_token(folder)
    assert load_model(folder).spec.mask_token_id == 151666


def test_dream_mask_token_found_by_name_without_config_id(written, tmp_path):
    folder = copy_of(written, "dream", tmp_path)
    edit_json(folder / "config.json", lambda d: d.pop("mask_token_id"))
    assert load_model(folder).spec.mask_token_id == 151666


def test_unknown_model_type_is_reported(written, tmp_path):
    folder = copy_of(written, "sdar", tmp_path)
    edit_json(folder / "config.json", lambda d: d.update(model_type="mamba"))
    msg = load_error(folder)
    assert "config.json" in msg
    assert "unknown model_type 'mamba'" in msg


@pytest.mark.parametrize("option,value,named", [
    ("block_type", "sequential", "block_type 'sequential'"),
    ("alibi", True, "alibi"),
])
def test_unsupported_llada_option_is_reported(option, value, named, written, tmp_path):
    folder = copy_of(written, "llada", tmp_path)
    edit_json(folder / "config.json", lambda d: d.update({option: value}))
    msg = load_error(folder)
    assert "config.json" in msg
    assert named in msg


def _shard_sdar(folder: Path) -> tuple[str, str]:
    """Split model.safetensors into two shards + the HF index; returns the shard names."""
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    half = len(names) // 2
    weight_map = {n: (first if i < half else second) for i, n in enumerate(names)}
    for shard in (first, second):
        part = {n: tensors[n] for n in names if weight_map[n] == shard}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "model.safetensors").unlink()
    return first, second


def test_sharded_checkpoint_loads_identically(written, loaded, tmp_path):
    folder = copy_of(written, "sdar", tmp_path)
    _shard_sdar(folder)
    sharded = load_model(folder)
    assert sharded.spec == loaded["sdar"].spec
    ids = token_ids(seed=2)
    torch.testing.assert_close(own_mask_logits(sharded, ids), own_mask_logits(loaded["sdar"], ids),
                               atol=0, rtol=0)


def test_missing_shard_is_named(written, tmp_path):
    folder = copy_of(written, "sdar", tmp_path)
    _, second = _shard_sdar(folder)
    (folder / second).unlink()
    msg = load_error(folder)
    assert second in msg
    assert "model.safetensors.index.json" in msg
    assert "missing" in msg


# --- 5. the convert / info CLI -----------------------------------------------------------------
# Each CLI run is a fresh Python process (~3-5 s of imports).  The two runs that need nothing but
# the written checkpoints start in the background when the module starts (cli_runs, autouse), so
# they overlap with the in-process tests; the tests below wait for them and check the results.


def _cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "tracerl.cli", *map(str, args)]


def _cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


class CliRun:
    """A CLI subprocess started now, finished (stdout, stderr, returncode) on ``result()``."""

    def __init__(self, *args, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            _cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=cwd, env=_cli_env())
        self._done: subprocess.CompletedProcess | None = None

    def result(self, timeout: float = 120) -> subprocess.CompletedProcess:
        if self._done is None:
            out, err = self.proc.communicate(timeout=timeout)
            self._done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self._done

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def cli_runs(written, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    bad = root / "not-a-model"
    bad.mkdir()
    (bad / "readme.txt").write_text("no config here\n")
    runs = {
        "convert": CliRun("convert", written["llada"]["folder"], root / "converted", "--json", cwd=root),
        "bad": CliRun("convert", bad, root / "bad-out", "--json", cwd=root),
    }
    yield {"root": root, "converted": root / "converted", "bad_folder": bad,
           "bad_out": root / "bad-out", **runs}
    for run_ in runs.values():
        run_.stop()


def last_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no stdout"
    return json.loads(lines[-1])


def test_cli_convert_then_info(cli_runs, loaded):
    dst = cli_runs["converted"]
    done = cli_runs["convert"].result()
    assert done.returncode == 0, done.stderr
    out = last_json_line(done.stdout)
    assert out["family"] == "full"
    assert out["mask_token_id"] == 126336
    assert out["source_layout"] == "llada"
    assert Path(out["output"]) == dst

    shown = subprocess.run(_cli_command("info", dst, "--json"), capture_output=True, text=True,
                           cwd=cli_runs["root"], env=_cli_env(), timeout=120)
    assert shown.returncode == 0, shown.stderr
    info = last_json_line(shown.stdout)
    for key in ("family", "mask_token_id", "block_size", "attention", "source_layout"):
        assert info[key] == out[key], key
    assert info["backbone"] == "llama"
    assert info["mask_token"] == "<|mdm_mask|>"

    # The converted folder is the same model as the source.
    ids = token_ids(seed=3)
    torch.testing.assert_close(own_mask_logits(load_model(dst), ids),
                               own_mask_logits(loaded["llada"], ids), atol=0, rtol=0)


def test_cli_convert_of_a_bad_folder_exits_2_with_one_line(cli_runs):
    done = cli_runs["bad"].result()
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert str(cli_runs["bad_folder"]) in lines[0]
    assert "config.json" in lines[0]
    assert done.stdout.strip() == ""
    assert not cli_runs["bad_out"].exists()
