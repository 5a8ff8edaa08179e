"""Helpers for model tests: tiny HF reference models (random init, built from configs) and a tiny
tokenizer, all created locally (nothing is downloaded)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from realflow.models.generation import GenerationConfig

VOCAB = 101
PAD, BOS, EOS = 0, 1, 2

# name -> (HF model_type, HF config kwargs). Weights use a larger init so logits are far from ties.
HF_CASES: dict[str, tuple[str, dict]] = {
    "llama": (
        "llama",
        dict(num_key_value_heads=2, tie_word_embeddings=False),
    ),
    "llama_llama3_rope": (
        "llama",
        dict(
            num_key_value_heads=1,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama_linear_rope_tied_bias": (
        "llama",
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        ),
    ),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "gpt2": ("gpt2", dict()),
}


def hf_config(case: str):
    """A tiny transformers config (2 layers, hidden 64) for one of HF_CASES."""
    from transformers import AutoConfig

    model_type, extra = HF_CASES[case]
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if model_type == "gpt2":
        sizes = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.1)
        sizes.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        sizes = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            initializer_range=0.1,
        )
    return AutoConfig.for_model(model_type, **common, **sizes, **extra)


def hf_model(case: str, kind: str = "lm", seed: int = 0):
    """A random-init transformers model of one case; kind lm / critic / reward."""
    import transformers

    cfg = hf_config(case)
    if kind != "lm":
        cfg.num_labels = 1
    auto = {
        "lm": transformers.AutoModelForCausalLM,
        "critic": transformers.AutoModelForTokenClassification,
        "reward": transformers.AutoModelForSequenceClassification,
    }[kind]
    torch.manual_seed(seed)
    return auto.from_config(cfg).eval()


def make_tokenizer():
    """A word-level PreTrainedTokenizerFast over VOCAB tokens: <pad>, <s>, </s>, w3..w100."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def random_packed(
    lens: list[int], seed: int = 0, low: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids_T, cu_seqlens_B1) of random tokens (no special ids) with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, VOCAB, (sum(lens),), generator=g)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return ids, cu


def pad_batch(ids_T: torch.Tensor, cu: torch.Tensor, left: bool = False):
    """Right- (or left-) padded (input_ids_BL, attention_mask_BL) of a packed batch."""
    lens = (cu[1:] - cu[:-1]).tolist()
    width = max(lens)
    ids = torch.full((len(lens), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for b, n in enumerate(lens):
        sl = slice(width - n, width) if left else slice(0, n)
        ids[b, sl] = ids_T[cu[b] : cu[b + 1]]
        mask[b, sl] = 1
    return ids, mask


def unpad(x_BL: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Packed (T, ...) rows of a right-padded (B, L, ...) tensor."""
    lens = (cu[1:] - cu[:-1]).tolist()
    return torch.cat([x_BL[b, :n] for b, n in enumerate(lens)])


def reference_logprobs(logits: list[float], g: GenerationConfig) -> dict[int, float]:
    """token -> log-prob under the documented sampling distribution of one row of logits
    (plain Python, float64; tokens left out are not allowed). The tests' reference for
    realflow.models.generation.process_logits.

    Greedy: the plain softmax. Otherwise logits / temperature; top_k keeps every token whose
    logit is >= the k-th largest; top_p then keeps every token whose renormalised probability
    mass of *strictly more probable* tokens is < top_p."""
    if g.greedy:
        z = list(logits)
    else:
        z = [x / g.temperature for x in logits]
    allowed = [i for i in range(len(z)) if z[i] > -math.inf]
    if not g.greedy and 0 < g.top_k < len(z):
        kth = sorted(z, reverse=True)[g.top_k - 1]
        allowed = [i for i in allowed if z[i] >= kth]
    if not g.greedy and g.top_p < 1.0:
        top = max(z[i] for i in allowed)
        w = {i: math.exp(z[i] - top) for i in allowed}
        total = sum(w.values())
        allowed = [i for i in allowed if sum(w[j] for j in w if z[j] > z[i]) / total < g.top_p]
    top = max(z[i] for i in allowed)
    log_norm = top + math.log(sum(math.exp(z[i] - top) for i in allowed))
    return {i: z[i] - log_norm for i in allowed}
