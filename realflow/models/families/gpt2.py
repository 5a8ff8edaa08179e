"""GPT-2: learned positions, LayerNorm, gelu_new MLP, biases everywhere, tied LM head.

HF stores its projections as `Conv1D` (weight shaped (in, out), the transpose of nn.Linear) and
fuses q/k/v into `attn.c_attn`; the converters transpose and split/concatenate them.
HF names: `transformer.{wte, wpe}`, `transformer.h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj}`, `transformer.ln_f`, `lm_head` / `classifier` (critic) / `score` (reward).
"""

from __future__ import annotations

import re

import torch

from realflow.models.config import TransformerConfig
from realflow.models.families.base import HFFamily, StateDict, with_defaults

GPT2_DEFAULTS = dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_inner=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    initializer_range=0.02,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    bos_token_id=50256,
    eos_token_id=50256,
    pad_token_id=None,
    tie_word_embeddings=True,
)
_IGNORED = [
    r".*attn\.(masked_)?bias",  # causal-mask buffers of old checkpoints
    r"lm_head\.weight",
    r"score\..*",
    r"classifier\..*",
]
# (realflow suffix, HF suffix, is a Conv1D weight to transpose)
_LAYER_MAP = [
    ("attn_norm.weight", "ln_1.weight", False),
    ("attn_norm.bias", "ln_1.bias", False),
    ("attn.o_proj.weight", "attn.c_proj.weight", True),
    ("attn.o_proj.bias", "attn.c_proj.bias", False),
    ("mlp_norm.weight", "ln_2.weight", False),
    ("mlp_norm.bias", "ln_2.bias", False),
    ("mlp.up_proj.weight", "mlp.c_fc.weight", True),
    ("mlp.up_proj.bias", "mlp.c_fc.bias", False),
    ("mlp.down_proj.weight", "mlp.c_proj.weight", True),
    ("mlp.down_proj.bias", "mlp.c_proj.bias", False),
]


def _config_from_hf(hf_config: dict) -> TransformerConfig:
    hf = with_defaults(hf_config, GPT2_DEFAULTS)
    if not hf["scale_attn_weights"] or hf["scale_attn_by_inverse_layer_idx"]:
        raise ValueError(
            "gpt2 with scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true is not supported"
        )
    d = hf["n_embd"]
    return TransformerConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=d,
        intermediate_size=hf["n_inner"] or 4 * d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        max_position_embeddings=hf["n_positions"],
        norm_type="layer",
        norm_eps=hf["layer_norm_epsilon"],
        activation=hf["activation_function"],
        gated_mlp=False,
        position="learned",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf["tie_word_embeddings"],
        initializer_range=hf["initializer_range"],
        bos_token_id=hf["bos_token_id"],
        eos_token_id=hf["eos_token_id"],
        pad_token_id=hf["pad_token_id"],
        extra_hf=dict(hf_config),
    )


def _config_to_hf(cfg: TransformerConfig) -> dict:
    problems = []
    if cfg.norm_type != "layer" or cfg.gated_mlp or cfg.position != "learned":
        problems.append("needs norm_type=layer, gated_mlp=False, position=learned")
    if not (cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias) or cfg.n_kv_heads != cfg.n_heads:
        problems.append("needs all biases and no grouped-query attention")
    if cfg.head_dim * cfg.n_heads != cfg.hidden_size:
        problems.append("needs head_dim * n_heads == hidden_size")
    if problems:
        raise ValueError(f"config cannot be saved as gpt2: {'; '.join(problems)}")
    return {
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_position_embeddings,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.intermediate_size,
        "activation_function": cfg.activation,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


def _head_map(cfg: TransformerConfig, head: str) -> dict[str, str]:
    if head == "lm":
        return {} if cfg.tie_word_embeddings else {"lm_head.weight": "lm_head.weight"}
    if head == "critic":
        m = {"score.weight": "classifier.weight"}
        if cfg.critic_head_bias:
            m["score.bias"] = "classifier.bias"
        return m
    return {"score.weight": "score.weight"}


def _from_hf(sd: StateDict, cfg: TransformerConfig, head: str) -> StateDict:
    heads = ("lm_head.", "score.", "classifier.")
    sd = {
        (k if k.startswith(("transformer.", *heads)) else "transformer." + k): v
        for k, v in sd.items()
    }
    out: StateDict = {"embed_tokens.weight": _take(sd, "transformer.wte.weight")}
    out["embed_positions.weight"] = _take(sd, "transformer.wpe.weight")
    d = cfg.hidden_size
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        for ours, theirs, conv in _LAYER_MAP:
            t = _take(sd, p + theirs)
            out[f"layers.{i}.{ours}"] = t.t().contiguous() if conv else t
        w, b = _take(sd, p + "attn.c_attn.weight"), _take(sd, p + "attn.c_attn.bias")
        for j, name in enumerate("qkv"):
            out[f"layers.{i}.attn.{name}_proj.weight"] = w[:, j * d : (j + 1) * d].t().contiguous()
            out[f"layers.{i}.attn.{name}_proj.bias"] = b[j * d : (j + 1) * d]
    out["norm.weight"] = _take(sd, "transformer.ln_f.weight")
    out["norm.bias"] = _take(sd, "transformer.ln_f.bias")
    for ours, theirs in _head_map(cfg, head).items():
        if theirs in sd:
            out[ours] = sd.pop(theirs)
    leftover = [k for k in sd if not any(re.fullmatch(p, k) for p in _IGNORED)]
    if leftover:
        raise ValueError(f"unexpected parameters in gpt2 checkpoint: {sorted(leftover)[:10]}")
    return out


def _take(sd: StateDict, key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"gpt2 checkpoint is missing parameter {key!r}")
    return sd.pop(key)


def _to_hf(sd: StateDict, cfg: TransformerConfig, head: str) -> StateDict:
    out: StateDict = {
        "transformer.wte.weight": sd["embed_tokens.weight"],
        "transformer.wpe.weight": sd["embed_positions.weight"],
    }
    for i in range(cfg.n_layers):
        p, q = f"transformer.h.{i}.", f"layers.{i}."
        for ours, theirs, conv in _LAYER_MAP:
            t = sd[q + ours]
            out[p + theirs] = t.t().contiguous() if conv else t
        ws = [sd[f"{q}attn.{n}_proj.weight"] for n in "qkv"]
        out[p + "attn.c_attn.weight"] = torch.cat(ws, dim=0).t().contiguous()
        out[p + "attn.c_attn.bias"] = torch.cat([sd[f"{q}attn.{n}_proj.bias"] for n in "qkv"])
    out["transformer.ln_f.weight"] = sd["norm.weight"]
    out["transformer.ln_f.bias"] = sd["norm.bias"]
    for ours, theirs in _head_map(cfg, head).items():
        out[theirs] = sd[ours]
    return out


def _param_names(cfg: TransformerConfig, head: str) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {
        "embedding": ["transformer.wte.weight", "transformer.wpe.weight"]
    }
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        names = [p + theirs for _, theirs, _ in _LAYER_MAP]
        groups[f"block.{i}"] = names + [p + "attn.c_attn.weight", p + "attn.c_attn.bias"]
    groups["head"] = ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    groups["head"] += list(_head_map(cfg, head).values())
    return groups


def _modules(cfg: TransformerConfig, head: str) -> dict[str, tuple[str, int]]:
    """q, k and v are the three row blocks (output features) of HF's fused `attn.c_attn`."""
    m = {"embed_tokens": ("transformer.wte", 0), "embed_positions": ("transformer.wpe", 0)}
    for i in range(cfg.n_layers):
        p, q = f"transformer.h.{i}.", f"layers.{i}."
        for ours, theirs, _ in _LAYER_MAP:
            m[q + ours.rsplit(".", 1)[0]] = (p + theirs.rsplit(".", 1)[0], 0)
        for j, name in enumerate("qkv"):
            m[f"{q}attn.{name}_proj"] = (p + "attn.c_attn", j)
    m["norm"] = ("transformer.ln_f", 0)
    for ours, theirs in _head_map(cfg, head).items():
        m[ours.rsplit(".", 1)[0]] = (theirs.rsplit(".", 1)[0], 0)
    return m


GPT2 = HFFamily(
    name="gpt2",
    model_types=("gpt2",),
    architectures={
        "lm": "GPT2LMHeadModel",
        "critic": "GPT2ForTokenClassification",
        "reward": "GPT2ForSequenceClassification",
    },
    config_from_hf=_config_from_hf,
    config_to_hf=_config_to_hf,
    state_dict_from_hf=_from_hf,
    state_dict_to_hf=_to_hf,
    hf_param_names=_param_names,
    hf_modules=_modules,
)
