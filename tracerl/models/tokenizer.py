"""Tokenizers: the tiny byte-level tokenizer shipped with tracerl, and mask-token set-up.

The tiny tokenizer is a byte-level BPE with *no merges*: every UTF-8 byte is one token, so it
encodes any text losslessly with a 256-symbol base vocabulary.  It is built in code (deterministic,
no files to download) and saved next to every tiny checkpoint as an ordinary HF ``tokenizer.json``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tracerl.errors import CheckpointError

# Special tokens of the tiny tokenizer, in id order after the 256 byte symbols.  The names follow
# the Qwen/SDAR convention so chat templates and stop tokens look like the real models'.
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>")
TINY_MASK_TOKEN = "<|MASK|>"

# ChatML, the format of Qwen/SDAR/TraDo/Dream chat models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Name of the mask token added to plain causal LMs that have none (AR -> diffusion adaptation).
ADDED_MASK_TOKEN = "<|mask|>"


def _byte_symbols() -> list[str]:
    """The printable stand-in ByteLevel uses for each raw byte 0..255 (GPT-2's table).

    Printable Latin-1 bytes stand for themselves; the others map to code points 256, 257, ...
    in byte order.  Token id == byte value in the tiny tokenizer.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    return symbols


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer: bytes 0..255, then the specials of TINY_SPECIAL_TOKENS."""
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token=TINY_MASK_TOKEN,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def resolve_mask_token_id(
    tokenizer: PreTrainedTokenizerBase,
    *,
    candidates: tuple[str, ...],
    config_mask_id: int | None,
    where: str,
) -> int | None:
    """Find the mask id: the config's id if given, else the tokenizer's mask token or a known name.

    Returns None when no mask token exists (the caller decides whether to add one).
    """
    if config_mask_id is not None:
        return int(config_mask_id)
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    vocab = tokenizer.get_vocab()
    for name in candidates:
        if name in vocab:
            return int(vocab[name])
    return None


def check_mask_token_id(
    tokenizer: PreTrainedTokenizerBase, mask_id: int, num_embeddings: int, where: str
) -> None:
    """A usable mask id has an embedding row and is not a token the model must emit."""
    if not 0 <= mask_id < num_embeddings:
        raise CheckpointError(
            f"{where}: mask token id {mask_id} is outside the embedding table "
            f"(0..{num_embeddings - 1})"
        )
    for role in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(tokenizer, role, None) == mask_id:
            raise CheckpointError(
                f"{where}: mask token id {mask_id} is also the tokenizer's {role.removesuffix('_id')}; "
                "the mask token must be a dedicated token"
            )
