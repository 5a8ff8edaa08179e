"""Tokenizer loading: local Hugging Face tokenizer directories and the tiny built-in tokenizer.

realflow never downloads anything: `load_tokenizer` reads a local directory (with
`local_files_only=True`) or returns the built-in tokenizer for the name `"builtin"` (and any
`"builtin:<model>"` name, so built-in models get it too).

The built-in tokenizer is character-level over printable ASCII plus newline, where a space merges
with the character after it (`" 4"` is one token). Prompts like `"rev 4 7 1 2 ="` therefore cost one
token per item, and `decode(encode(text)) == text` for every ASCII text. Ids:

| token | id | role |
| --- | --- | --- |
| `<pad>` | 0 | pad |
| `<s>` | 1 | bos |
| `</s>` | 2 | eos |
| `<unk>` | 3 | unk (any non-ASCII character) |
| `" "`..`"~"`, `"\\n"` | 4..99 | single characters |
| `" !"`..`" ~"`, `" \\n"` | 100..194 | a space and the character after it |

Sequences are built with `prompt_token_ids` (what the tokenizer itself puts before a text, then
the prompt) and `text_token_ids` (no special tokens): use them everywhere so that datasets,
generation and rewards agree on where BOS goes. "What the tokenizer puts before a text" is what
`tokenizer(text)` adds in transformers (`bos_ids`): BOS for llama-style tokenizers and the built-in
one, nothing for gpt2 and qwen2. So a model trained by realflow sees the ids that plain
`transformers` gives it for the same prompt, and an exported checkpoint behaves the same there.

Its chat template is `realflow.data.chat.DEFAULT_CHAT_TEMPLATE` (`<role>\\n` + content, EOS after
assistant messages, `\\n` after every message).

The shipped files in `realflow/data/builtin/tokenizer/` are written by `write_builtin_tokenizer`
(`python -m realflow.data.tokenizer` regenerates them); a test checks they match the code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

BUILTIN_NAME = "builtin"
BUILTIN_TOKENIZER_DIR = Path(__file__).parent / "builtin" / "tokenizer"
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
# One pre-token is: an optional space and one non-space character, or a lone space.
_PRE_TOKEN_PATTERN = r" ?[^ ]| "
_MODEL_MAX_LENGTH = 4096
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded: a wrong path, or a directory without tokenizer files."""


def builtin_vocab() -> dict[str, int]:
    """The built-in vocabulary, token -> id, in id order (195 tokens)."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tokens = [*SPECIAL_TOKENS, *chars, *(" " + c for c in chars if c != " ")]
    return {t: i for i, t in enumerate(tokens)}


def is_builtin_name(path_or_name: str) -> bool:
    """True for `"builtin"` and `"builtin:<anything>"` (built-in models share the tokenizer)."""
    return path_or_name == BUILTIN_NAME or path_or_name.startswith(BUILTIN_NAME + ":")


def build_builtin_tokenizer() -> PreTrainedTokenizerFast:
    """Build the built-in tokenizer in memory, deterministically (no files, no training)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = builtin_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PRE_TOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Like llama's: `tokenizer(text)` puts BOS first, as realflow does before every prompt.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    from realflow.data.chat import DEFAULT_CHAT_TEMPLATE

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=_MODEL_MAX_LENGTH,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def write_builtin_tokenizer(out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json of the built-in
    tokenizer into `out_dir` (the shipped copy lives in BUILTIN_TOKENIZER_DIR)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_builtin_tokenizer()
    tok.backend_tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
    }
    # "PreTrainedTokenizerFast" loads in transformers 4.x and 5.x alike.
    from realflow.data.chat import DEFAULT_CHAT_TEMPLATE

    config = {
        "chat_template": DEFAULT_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": _MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return out


def load_tokenizer(path_or_name: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local HF directory, or the built-in one by name ("builtin",
    "builtin:<model>"). Never touches the network. A tokenizer without a pad token gets its EOS
    token as pad (realflow packs sequences, so pad only fills generation buffers)."""
    name = str(path_or_name)
    if is_builtin_name(name):
        if (BUILTIN_TOKENIZER_DIR / "tokenizer.json").is_file():
            return _load_dir(BUILTIN_TOKENIZER_DIR)
        logger.warning(
            "shipped built-in tokenizer missing in %s; building it", BUILTIN_TOKENIZER_DIR
        )
        return build_builtin_tokenizer()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise TokenizerError(
            f"tokenizer '{name}' is not a local directory and not a built-in name "
            f"('{BUILTIN_NAME}'); realflow never downloads from the Hugging Face hub: "
            "download the model or tokenizer first and give its directory"
        )
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        found = sorted(p.name for p in path.iterdir())
        listed = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        raise TokenizerError(
            f"directory '{path}' has no tokenizer: expected one of {', '.join(_TOKENIZER_FILES)} "
            f"(found: {listed or 'nothing'})"
        )
    tok = _load_dir(path)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        logger.info("tokenizer in %s has no pad token; using eos %r as pad", path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def _load_dir(path: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load the tokenizer in '{path}': {e}") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TokenizerError(
            f"tokenizer in '{path}' is a {type(tok).__name__}, not a fast tokenizer; "
            "realflow needs a tokenizer.json"
        )
    return tok


def text_token_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of `text` with no special tokens, shape (L,)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_token_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of a prompt: `bos_ids(tokenizer)` then `text`, shape (L,)."""
    return bos_ids(tokenizer) + text_token_ids(tokenizer, text)


_PROBE = "a"


def bos_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The ids the tokenizer itself puts before a text (`add_special_tokens=True`), which realflow
    puts before every prompt: `[bos_token_id]` for llama-style tokenizers and the built-in one,
    `[]` for tokenizers that add no BOS (gpt2, whose BOS token exists but is never added; qwen2).
    Special tokens a tokenizer adds after the text (some add EOS) are not included."""
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    if not plain:  # the probe encodes to nothing: only a leading BOS can be told apart
        bos = tokenizer.bos_token_id
        return [int(bos)] if full[:1] == [bos] and bos is not None else []
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return [int(i) for i in full[:start]]
    raise TokenizerError(
        f"cannot tell which special tokens {type(tokenizer).__name__} adds: {_PROBE!r} encodes "
        f"to {plain} alone and to {full} with special tokens"
    )


def eos_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """`[eos_token_id]`, or `[]` when the tokenizer has no EOS token."""
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    logger.info("wrote %s", write_builtin_tokenizer(BUILTIN_TOKENIZER_DIR))
