"""tracerl.models: logit parity with the HF backbones, presets, save/load, adaptation, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tracerl import masks
from tracerl.errors import CheckpointError
from tracerl.models import PRESETS, build_preset, load_model
from tracerl.models.tokenizer import ADDED_MASK_TOKEN, TINY_MASK_TOKEN, _byte_symbols

ATOL = 1e-5
PRESET_NAMES = ["tiny-block", "tiny-full", "tiny-shifted"]
EXPECTED_SPEC = {  # family, attention, block size of each preset
    "tiny-block": ("block", "block", 4),
    "tiny-full": ("full", "full", 8),
    "tiny-shifted": ("shifted", "block", 4),
}
# Non-ASCII text: accents (composed and decomposed), CJK, emoji, whitespace runs, a chat marker.
TEXTS = [
    "héllo wörld — 日本語 🙂",
    "cafe\u0301 vs caf\u00e9",  # decomposed e + combining acute, then composed é
    "a  b\n\n\t c <|im_start|>user\nhi<|im_end|>",
]


def logits(model, ids, mask, positions):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions)


def causal_inputs(batch=2, length=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, length), generator=g)
    positions = torch.arange(length).repeat(batch, 1)
    return ids, positions


def left_padded_inputs(pad_id, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, :3] = False
    ids[0, :3] = pad_id
    return ids, masks.positions_from_valid(valid), valid


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each preset (seed 0) saved once: name -> folder.  Tests copy before they modify."""
    root = tmp_path_factory.mktemp("presets")
    return {name: load_model(name).save_pretrained(root / name) for name in PRESET_NAMES}


@pytest.fixture
def checkpoint(saved, tmp_path):
    """A private copy of the saved tiny-block checkpoint (tied embeddings: no lm_head stored)."""
    return Path(shutil.copytree(saved["tiny-block"], tmp_path / "ckpt"))


# --- logit parity with the transformers models -------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_causal_mask_reproduces_the_backbone_forward(name, saved):
    model = load_model(name)
    ids, positions = causal_inputs()
    ours = logits(model, ids, masks.causal_mask(positions), positions)

    reference = model.backbone(ids).logits.detach()
    assert ours.shape == (2, 13, model.vocab_size)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)

    # an independent instance read by transformers itself from the saved folder
    independent = transformers.AutoModelForCausalLM.from_pretrained(saved[name]).eval()
    assert type(independent) is type(model.backbone)
    with torch.no_grad():
        torch.testing.assert_close(ours, independent(ids).logits, atol=ATOL, rtol=0)

    # the mask we pass is really used: full attention gives other logits
    full = logits(model, ids, masks.full_mask(13, torch.ones_like(ids, dtype=torch.bool)), positions)
    assert (full - reference).abs().max() > 1e-3


# --- presets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_is_deterministic_and_leaves_global_rng_alone(name):
    torch.manual_seed(1234)
    expected_draw = torch.rand(8)
    torch.manual_seed(1234)
    a = build_preset(name, seed=0)
    assert torch.equal(torch.rand(8), expected_draw), "building a preset consumed the global RNG"

    b = build_preset(name, seed=0)
    c = build_preset(name, seed=1)
    state_a, state_b, state_c = (m.backbone.state_dict() for m in (a, b, c))
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["model.embed_tokens.weight"], state_c["model.embed_tokens.weight"])
    assert not torch.equal(
        state_a["model.layers.0.self_attn.q_proj.weight"], state_c["model.layers.0.self_attn.q_proj.weight"]
    )
    family, attention, block_size = EXPECTED_SPEC[name]
    assert (a.spec.family, a.spec.attention, a.spec.block_size) == (family, attention, block_size)
    assert a.tokenizer.convert_ids_to_tokens(a.mask_token_id) == TINY_MASK_TOKEN


def test_every_preset_is_covered():
    assert sorted(PRESETS) == sorted(PRESET_NAMES)


def test_unknown_preset_names_the_presets():
    with pytest.raises(CheckpointError, match="tiny-block"):
        build_preset("tiny-huge")


# --- save -> load --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_save_load_round_trip(name, tmp_path):
    model = build_preset(name, seed=7)
    folder = model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(folder)

    assert loaded.spec == model.spec
    family, attention, block_size = EXPECTED_SPEC[name]
    assert (loaded.family, loaded.spec.attention, loaded.block_size) == (family, attention, block_size)
    assert loaded.mask_token_id == model.mask_token_id

    ids, positions, valid = left_padded_inputs(model.tokenizer.pad_token_id)
    before = logits(model, ids, model.attention_mask(positions, valid), positions)
    after = logits(loaded, ids, loaded.attention_mask(positions, valid), positions)
    torch.testing.assert_close(after, before, atol=0, rtol=0)

    config = json.loads((folder / "config.json").read_text())
    assert config["tracerl"]["family"] == family
    assert config["tracerl"]["block_size"] == block_size
    assert config["tracerl"]["attention"] == attention
    assert config["tracerl"]["mask_token_id"] == model.mask_token_id

    # transformers reads the weights and the tokenizer without tracerl
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for key in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(hf.state_dict()[key], model.backbone.state_dict()[key]), key
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.mask_token == TINY_MASK_TOKEN
    assert hf_tok.mask_token_id == model.mask_token_id
    assert hf_tok.eos_token_id == model.tokenizer.eos_token_id
    assert loaded.tokenizer.mask_token == TINY_MASK_TOKEN
    assert loaded.tokenizer.padding_side == "left"


@pytest.mark.parametrize(
    "name",
    ["tiny-block", "tiny-full", "tiny-shifted"],
)
def test_tokenizer_round_trips_ids(name, saved):
    original = build_preset(name).tokenizer
    reloaded = load_model(saved[name]).tokenizer
    # tokenizer.json read as it is.  (transformers' AutoTokenizer picks its class from model_type
    # and rebuilds a Qwen2 pipeline, NFC normaliser included, for model_type qwen2: fine for real
    # Qwen2/Dream tokenizers, not for the tiny byte-level one under the tiny-shifted preset.)
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(saved[name])
    for text in TEXTS:
        ids = original(text)["input_ids"]
        assert original.decode(ids) == text  # the byte-level tokenizer itself is lossless
        assert reloaded(text)["input_ids"] == ids, f"tracerl reload changes ids of {text!r}"
        assert hf_tok(text)["input_ids"] == ids, f"transformers changes ids of {text!r}"
        assert reloaded.decode(ids) == text


def test_saving_over_a_checkpoint_replaces_it(tmp_path):
    folder = tmp_path / "ckpt"
    build_preset("tiny-block", seed=0).save_pretrained(folder)
    (folder / "stale.txt").write_text("from the first save")

    newer = build_preset("tiny-full", seed=1)
    assert newer.save_pretrained(folder) == folder

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "temporary folders left behind"
    assert not (folder / "stale.txt").exists()
    loaded = load_model(folder)
    assert loaded.spec == newer.spec
    assert torch.equal(loaded.backbone.model.embed_tokens.weight, newer.backbone.model.embed_tokens.weight)

    # and again over the replaced one (a second replacement must not trip over the first)
    build_preset("tiny-full", seed=2).save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --- plain HF causal LMs: adaptation to diffusion ------------------------------------------------


def byte_tokenizer_without_mask():
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


PLAIN_LMS = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, True),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, False),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, False),
}


def write_plain_lm(folder, model_type):
    config_cls, model_cls, tied = PLAIN_LMS[model_type]
    tokenizer = byte_tokenizer_without_mask()
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = model_cls(config).eval()
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf, tokenizer


@pytest.mark.parametrize("model_type", list(PLAIN_LMS))
def test_plain_causal_lm_loads_as_shifted_with_a_new_mask_token(model_type, tmp_path):
    hf, tokenizer = write_plain_lm(tmp_path / "plain", model_type)
    vocab = len(tokenizer)
    assert tokenizer.mask_token_id is None

    model = load_model(tmp_path / "plain")
    assert model.family == "shifted" and model.spec.logit_shift == 1
    assert model.spec.attention == "block"
    assert model.spec.source_layout == model_type
    assert model.mask_token_id == vocab, "the new mask token gets the next id"
    assert model.tokenizer.mask_token == ADDED_MASK_TOKEN
    assert model.tokenizer.convert_tokens_to_ids(ADDED_MASK_TOKEN) == vocab
    assert model.backbone.get_input_embeddings().weight.shape[0] == vocab + 1
    assert model.vocab_size == vocab + 1
    assert model.mask_token_id not in (model.tokenizer.eos_token_id, model.tokenizer.pad_token_id)

    # ordinary tokens: the resize changed nothing (one extra logit column for the mask token)
    ids, positions = causal_inputs()
    with torch.no_grad():
        reference = hf(ids).logits
    ours = logits(model, ids, masks.causal_mask(positions), positions)
    torch.testing.assert_close(ours[..., :vocab], reference, atol=ATOL, rtol=0)
    assert ours.shape[-1] == vocab + 1

    # block size 1 of the default block attention is the causal attention it was trained with
    block1 = load_model(tmp_path / "plain", block_size=1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    ours1 = logits(block1, ids, block1.attention_mask(positions, valid), positions)
    torch.testing.assert_close(ours1[..., :vocab], reference, atol=ATOL, rtol=0)

    # saving and reloading keeps the mask id, the spec and the logits
    folder = model.save_pretrained(tmp_path / "adapted")
    again = load_model(folder)
    assert again.mask_token_id == vocab and again.tokenizer.mask_token_id == vocab
    assert again.spec == model.spec
    with_mask = ids.clone()
    with_mask[:, 5:9] = vocab
    torch.testing.assert_close(
        logits(again, with_mask, masks.causal_mask(positions), positions),
        logits(model, with_mask, masks.causal_mask(positions), positions),
        atol=0, rtol=0,
    )
    assert transformers.AutoModelForCausalLM.from_pretrained(folder).config.vocab_size == vocab + 1


def case_id(value):
    """Readable test ids: the JSON of the changes, then the words the message must contain."""
    if isinstance(value, dict):
        return json.dumps(value)
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_change_the_spec(saved, tmp_path):
    model = load_model("tiny-block", block_size=8)
    assert model.spec.block_size == 8 and model.family == "block"
    positions = torch.arange(16)[None]
    valid = torch.ones(1, 16, dtype=torch.bool)
    assert torch.equal(model.attention_mask(positions, valid), masks.block_causal_mask(positions, 8))

    shifted = load_model("tiny-block", family="shifted")
    assert (shifted.family, shifted.spec.attention) == ("shifted", "block")
    full = load_model("tiny-shifted", family="full")
    assert (full.family, full.spec.attention) == ("full", "full")
    bidirectional = load_model(saved["tiny-shifted"], attention="full", block_size=16)
    assert (bidirectional.family, bidirectional.spec.attention, bidirectional.block_size) == (
        "shifted", "full", 16)
    from_folder = load_model(saved["tiny-full"], family="block", block_size=2)
    assert (from_folder.family, from_folder.spec.attention, from_folder.block_size) == ("block", "block", 2)

    # an overridden spec is what gets saved, so the checkpoint reloads without the flags
    assert load_model(from_folder.save_pretrained(tmp_path / "overridden")).spec == from_folder.spec


@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(family="autoregressive"), ["family", "autoregressive", "block, full, shifted"]),
        (dict(block_size=0), ["block_size", "0"]),
        (dict(block_size=-4), ["block_size", "-4"]),
        (dict(attention="sideways"), ["attention", "sideways"]),
        (dict(family="block", attention="full"), ["block", "attention"]),
    ],
    ids=case_id,
)
@pytest.mark.parametrize("source", ["preset", "folder"])
def test_invalid_overrides_raise_naming_the_option(overrides, words, source, saved):
    name = "tiny-block" if source == "preset" else saved["tiny-block"]
    with pytest.raises(CheckpointError) as info:
        load_model(name, **overrides)
    for word in words:
        assert word in str(info.value)


# --- bad checkpoints -----------------------------------------------------------------------------


def edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "tracerl_update":
            data["tracerl"].update(value)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def edit_weights(folder, change):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


def load_error(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    return str(info.value)


def test_missing_folder(tmp_path):
    message = load_error(tmp_path / "no-such-model")
    assert "no-such-model" in message and "no such folder" in message


def test_folder_without_config(checkpoint):
    (checkpoint / "config.json").unlink()
    message = load_error(checkpoint)
    assert "config.json" in message and "missing" in message


def test_invalid_json_names_the_line(checkpoint):
    (checkpoint / "config.json").write_text('{\n  "model_type": "qwen3",\n  "hidden_size": 128,,\n}\n')
    message = load_error(checkpoint)
    assert "config.json:3" in message and "invalid JSON" in message


def test_unknown_model_type(checkpoint):
    edit_config(checkpoint, model_type="gpt2")
    message = load_error(checkpoint)
    assert "config.json" in message and "'gpt2'" in message and "model_type" in message


def test_unknown_model_type_without_tracerl_section(checkpoint):
    data = json.loads((checkpoint / "config.json").read_text())
    del data["tracerl"]
    data["model_type"] = "mamba"
    (checkpoint / "config.json").write_text(json.dumps(data))
    message = load_error(checkpoint)
    assert "'mamba'" in message and "qwen3" in message  # names the supported types


def test_missing_safetensors(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    message = load_error(checkpoint)
    assert str(checkpoint) in message and "model.safetensors" in message


def test_only_pickle_weights(checkpoint):
    state = load_file(str(checkpoint / "model.safetensors"))
    torch.save(state, checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    message = load_error(checkpoint)
    assert "pytorch_model" in message and "safetensors" in message


def test_weight_missing_from_safetensors(checkpoint):
    name = "model.layers.2.mlp.up_proj.weight"
    edit_weights(checkpoint, lambda state: state.pop(name))
    message = load_error(checkpoint)
    assert name in message and "missing" in message and "model.safetensors" in message


def test_unexpected_tensor(checkpoint):
    edit_weights(checkpoint, lambda state: state.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    message = load_error(checkpoint)
    assert "model.layers.9.extra.weight" in message and "model.safetensors" in message


def test_tensor_with_wrong_shape(checkpoint):
    name = "model.layers.1.self_attn.q_proj.weight"
    edit_weights(checkpoint, lambda state: state.update({name: torch.zeros(127, 128)}))
    message = load_error(checkpoint)
    assert name in message and "(127, 128)" in message and "(128, 128)" in message
    assert "model.safetensors" in message


def test_integer_tensor(checkpoint):
    name = "model.norm.weight"
    edit_weights(checkpoint, lambda state: state.update({name: torch.ones(128, dtype=torch.int32)}))
    message = load_error(checkpoint)
    assert name in message and "floating point" in message


def test_edited_hidden_size_is_a_shape_mismatch(checkpoint):
    edit_config(checkpoint, hidden_size=96)
    message = load_error(checkpoint)
    assert "model.safetensors" in message and "config.json" in message
    assert "128" in message and "96" in message


def test_folder_without_tokenizer(checkpoint):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (checkpoint / name).unlink()
    message = load_error(checkpoint)
    assert str(checkpoint) in message and "tokenizer" in message


def test_unreadable_tokenizer(checkpoint):
    (checkpoint / "tokenizer.json").write_text("{ not json")
    message = load_error(checkpoint)
    assert "tokenizer" in message


@pytest.mark.parametrize(
    "section,words",
    [
        ({"colour": "blue"}, ["'colour'", "tracerl"]),  # unknown key
        ({"family": "autoregressive"}, ["family", "'autoregressive'"]),
        ({"family": "full"}, ["attention"]),  # full family with the stored block attention
        ({"mask_token_id": 5000}, ["5000", "embedding"]),
        ({"mask_token_id": -1}, ["-1", "embedding"]),
        ({"mask_token_id": 256}, ["256", "eos"]),  # <|endoftext|>: eos and pad of the tiny tokenizer
        ({"block_size": 0}, ["block_size"]),
        ({"format_version": 99}, ["format_version", "99"]),
        ({"mask_token_id": "259"}, ["mask_token_id"]),
        ({"mask_token_id": None}, ["mask_token_id"]),
        ({"format_version": "2"}, ["format_version"]),
        ({"block_size": True}, ["block_size"]),
    ],
    ids=case_id,
)
def test_bad_tracerl_section(checkpoint, section, words):
    edit_config(checkpoint, tracerl_update=section)
    message = load_error(checkpoint)
    assert "config.json" in message
    for word in words:
        assert word in message


def test_tracerl_section_without_mask_id(checkpoint):
    data = json.loads((checkpoint / "config.json").read_text())
    del data["tracerl"]["mask_token_id"]
    (checkpoint / "config.json").write_text(json.dumps(data))
    message = load_error(checkpoint)
    assert "config.json" in message and "mask_token_id" in message


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(hidden_size="128"), "hidden_size"),
        # the saved Qwen3 config lists layer_types, one per layer
        (dict(num_hidden_layers=3), "num_hidden_layers"),
        (dict(num_attention_heads=3), "q_proj"),
        (dict(vocab_size=300), "embed_tokens"),
        (dict(tie_word_embeddings=False), "lm_head.weight"),
    ],
    ids=case_id,
)
def test_edited_architecture_field(checkpoint, changes, field):
    edit_config(checkpoint, **changes)
    message = load_error(checkpoint)
    assert field in message
    assert "config.json" in message or "model.safetensors" in message


def test_untouched_copy_loads(checkpoint):
    """The corruption tests above start from a folder that loads."""
    assert load_model(checkpoint).spec.family == "block"


def test_special_token_ids_past_the_vocabulary_name_the_key(tmp_path):
    """Used to be an AssertionError from torch ("Padding_idx must be within num_embeddings")."""
    folder = tmp_path / "m"
    load_model("tiny-block").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value, shown in [("pad_token_id", 300, "pad_token_id=300"), ("eos_token_id", [2, 259, 260], "eos_token_id=260")]:
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=rf"config\.json: {shown} is not below vocab_size=260 "
                                                  rf"\(token ids are 0\.\.259\); fix vocab_size or {key}"):
            load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "tracerl": {**config["tracerl"], "mask_token_id": 260}}))
    with pytest.raises(CheckpointError, match=r"mask token id 260 is outside the embedding table \(0\.\.259\)"):
        load_model(folder)


def test_non_finite_weights_are_named():
    from tracerl.models import check_finite

    model = load_model("tiny-block")
    assert model.nonfinite_parameters() == [] and check_finite(model, "m") is model
    with torch.no_grad():
        model.backbone.model.layers[0].self_attn.q_proj.weight[1, 2] = float("-inf")
    assert model.nonfinite_parameters() == ["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(CheckpointError, match=r"^m: non-finite weights \(NaN or inf\) in "
                                              r"model\.layers\.0\.self_attn\.q_proj\.weight; the model cannot"):
        check_finite(model, "m")
