"""Exported checkpoints behave the same in plain transformers as in realflow, on the same text.

For each family a tokenizer with that family's special-token habits is built here:

- llama: `<s>` BOS that the tokenizer adds itself, `</s>` EOS, no pad token;
- gpt2: one `<|endoftext|>` token for BOS, EOS and UNK, never added by the tokenizer, no pad;
- qwen2: no BOS, `<|endoftext|>` as both EOS and pad.

realflow tokenizes as its datasets do (prompt_token_ids + answer + EOS), runs the model, saves it
with save_hf; transformers loads the directory with AutoTokenizer and AutoModelFor*, tokenizes the
text a user would write (prompt, answer, EOS token) in a padded batch, and must get the same ids,
the same reward scores and values, and the same greedy generations. Before: a reward model saved
with pad == EOS was read by HF one token before EOS, and a gpt2 prompt got a BOS in realflow only.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from realflow.data.tokenizer import load_tokenizer, prompt_token_ids, text_token_ids
from realflow.models.builtin import builtin_config
from realflow.models.generation import GenerationConfig, generate
from realflow.models.hf_io import ADDED_PAD_ROWS, load_hf, read_hf_config, save_hf
from realflow.models.transformer import PackedTransformer
from realflow.system.preflight import tokenizer_differences

N_WORDS = 60
ROWS = [("w5 w17 w3", "w8 w9"), ("w40", "w41 w42 w43 w44 w45"), ("w7 w7 w7 w7 w7 w7", "w12")]
AUTO = {
    "lm": transformers.AutoModelForCausalLM,
    "critic": transformers.AutoModelForTokenClassification,
    "reward": transformers.AutoModelForSequenceClassification,
}
# family -> model vocab rows beyond the tokenizer (qwen2 checkpoints have spare rows; the others
# none, so a pad token added on export needs a new row)
SPARE_ROWS = {"llama": 0, "gpt2": 0, "qwen2": 8}


def family_tokenizer(family: str, out_dir):
    """A word-level tokenizer with `family`'s special tokens, saved to `out_dir` and loaded
    back the way realflow loads a checkpoint's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(3, N_WORDS)]
    if family == "llama":
        specials, kw = ["<unk>", "<s>", "</s>"], dict(bos_token="<s>", eos_token="</s>")
    elif family == "gpt2":
        specials = ["<|endoftext|>"]
        kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        kw = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    vocab = {t: i for i, t in enumerate(words + specials if family == "gpt2" else specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=kw.get("unk_token", specials[0])))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if family == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", vocab["<s>"])]
        )
    tok.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=tok, **kw).save_pretrained(out_dir)
    return load_tokenizer(out_dir)


def realflow_model(family: str, tok, head: str, seed: int = 0) -> PackedTransformer:
    torch.manual_seed(seed)
    n = max(tok.get_vocab().values()) + 1 + SPARE_ROWS[family]
    cfg = builtin_config(
        f"tiny-{family}", n, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id if family == "qwen2" else None, initializer_range=0.1,
    )  # fmt: skip
    return PackedTransformer(cfg, head=head).eval()


def realflow_ids(tok, prompt: str, answer: str) -> list[int]:
    """A sequence as realflow's datasets build it."""
    return prompt_token_ids(tok, prompt) + text_token_ids(tok, " " + answer) + [tok.eos_token_id]


def hf_tokenizer(family: str, path):
    """The saved tokenizer as transformers loads it. transformers 5 loads any tokenizer of a
    qwen2 checkpoint as Qwen2Tokenizer (byte-level BPE), which cannot read this word-level one;
    a real Qwen2 tokenizer is one, so the qwen2 case loads the file as it is."""
    if family == "qwen2":
        return transformers.PreTrainedTokenizerFast.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def hf_batch(hf_tok, texts: list[str]):
    """What a transformers user writes: the tokenizer's own encoding, padded."""
    return hf_tok(texts, padding=True, return_tensors="pt")


def packed(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return torch.tensor([t for s in seqs for t in s]), cu


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_tokenizers")
    return {f: family_tokenizer(f, root / f) for f in SPARE_ROWS}


@pytest.mark.parametrize("family", sorted(SPARE_ROWS))
@pytest.mark.parametrize("head", ["reward", "critic"])
def test_scores_and_values_equal_in_transformers(family, head, tokenizers, tmp_path):
    tok = tokenizers[family]
    model = realflow_model(family, tok, head)
    seqs = [realflow_ids(tok, p, a) for p, a in ROWS]
    with torch.no_grad():
        ours = model(*packed(seqs))
    out = save_hf(model, tmp_path / head, tokenizer=tok)

    hf_tok = hf_tokenizer(family, out)
    hf = AUTO[head].from_pretrained(out).eval()
    enc = hf_batch(hf_tok, [f"{p} {a} {hf_tok.eos_token}" for p, a in ROWS])
    mask = enc["attention_mask"].bool()
    assert [row[m].tolist() for row, m in zip(enc["input_ids"], mask)] == seqs  # same ids
    assert not mask.all()  # the batch is padded
    with torch.no_grad():
        theirs = hf(**enc).logits.squeeze(-1)
    if head == "critic":
        theirs = theirs[mask]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(SPARE_ROWS))
def test_greedy_generations_equal_in_transformers(family, tokenizers, tmp_path):
    tok = tokenizers[family]
    model = realflow_model(family, tok, "lm", seed=1)
    out = save_hf(model, tmp_path / "lm", tokenizer=tok)
    hf_tok = hf_tokenizer(family, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    gconfig = GenerationConfig(max_new_tokens=8, greedy=True)
    for prompt, _ in ROWS:
        ids = prompt_token_ids(tok, prompt)
        enc = hf_tok(prompt, return_tensors="pt")
        assert enc["input_ids"][0].tolist() == ids
        with torch.no_grad():
            theirs = hf.generate(**enc, do_sample=False, max_new_tokens=8)[0, len(ids) :]
        ours = generate(model, *packed([ids]), gconfig).output_ids_T
        stop = theirs.tolist().index(tok.eos_token_id) + 1 if tok.eos_token_id in theirs else 8
        assert ours.tolist() == theirs[:stop].tolist()


@pytest.mark.parametrize("family", sorted(SPARE_ROWS))
def test_exported_reward_model_pad_and_reload(family, tokenizers, tmp_path):
    tok = tokenizers[family]
    model = realflow_model(family, tok, "reward", seed=2)
    out = save_hf(model, tmp_path / "rm", tokenizer=tok)
    hf_tok = hf_tokenizer(family, out)
    cfg = read_hf_config(out)
    # A pad token of its own, that HF pads and reads with; the source tokenizer is untouched.
    assert hf_tok.pad_token_id != hf_tok.eos_token_id and tok.pad_token_id == tok.eos_token_id
    assert cfg["pad_token_id"] == hf_tok.pad_token_id
    n = model.config.vocab_size
    assert cfg["vocab_size"] == (n + 1 if SPARE_ROWS[family] == 0 else n)
    assert cfg.get(ADDED_PAD_ROWS, 0) == (1 if SPARE_ROWS[family] == 0 else 0)
    # realflow loads it back in the trained shape (optimizer state and resume rely on it) ...
    again, again_tok = load_hf(out, head="reward")
    assert again.config.vocab_size == n
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    # ... saves it again unchanged, and its tokenizer passes the check against the actor's.
    save_hf(again, tmp_path / "rm2", tokenizer=again_tok)
    assert read_hf_config(tmp_path / "rm2") == cfg
    assert tokenizer_differences(again_tok, tok) == []
    # lm and critic exports keep the tokenizer as it is.
    for head in ("lm", "critic"):
        save_hf(realflow_model(family, tok, head), tmp_path / head, tokenizer=tok)
        assert read_hf_config(tmp_path / head)["vocab_size"] == n
