"""Llama and Qwen2: RMSNorm, rotary positions, gated SiLU MLP, grouped-query attention.

Qwen2 is Llama with biases on q/k/v (none on o_proj); both share the converters below.
HF names: `model.embed_tokens`, `model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}`, `model.norm`, `lm_head` / `score`.
"""

from __future__ import annotations

from functools import partial

from realflow.models.config import TransformerConfig
from realflow.models.families.base import (
    HFFamily,
    StateDict,
    group_hf_names,
    modules_of_name_map,
    rename_state_dict,
    rope_from_hf,
    rope_to_hf,
    with_defaults,
)

LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    head_dim=None,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    token_classification_bias=True,
    pretraining_tp=1,
)
QWEN2_DEFAULTS = {
    **LLAMA_DEFAULTS,
    "vocab_size": 151936,
    "intermediate_size": 22016,
    "max_position_embeddings": 32768,
    "bos_token_id": None,
    "eos_token_id": None,
    "use_sliding_window": False,
}
# Keys of another head or derived buffers, dropped when reading a checkpoint.
_IGNORED = [r".*rotary_emb\.inv_freq", r"lm_head\.weight", r"score\..*", r"classifier\..*"]


def _config_from_hf(hf_config: dict, family: str, defaults: dict, qwen: bool) -> TransformerConfig:
    hf = with_defaults(hf_config, defaults)
    if qwen and hf["use_sliding_window"]:
        raise ValueError("qwen2 checkpoints with use_sliding_window=true are not supported")
    theta, scaling = rope_from_hf(hf, 10000.0)
    return TransformerConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"],
        max_position_embeddings=hf["max_position_embeddings"],
        norm_type="rms",
        norm_eps=hf["rms_norm_eps"],
        activation=hf["hidden_act"],
        gated_mlp=True,
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=True if qwen else hf["attention_bias"],
        o_bias=False if qwen else hf["attention_bias"],
        mlp_bias=False if qwen else hf["mlp_bias"],
        critic_head_bias=hf["token_classification_bias"],
        tie_word_embeddings=hf["tie_word_embeddings"],
        initializer_range=hf["initializer_range"],
        bos_token_id=hf["bos_token_id"],
        eos_token_id=hf["eos_token_id"],
        pad_token_id=hf["pad_token_id"],
        extra_hf=dict(hf_config),
    )


def _config_to_hf(cfg: TransformerConfig, model_type: str, qwen: bool) -> dict:
    if qwen and not (cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias):
        raise ValueError("qwen2 needs qkv_bias=True, o_bias=False, mlp_bias=False")
    if not qwen and cfg.qkv_bias != cfg.o_bias:
        raise ValueError(
            f"llama has one attention_bias for q/k/v/o; got qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}"
        )
    if cfg.norm_type != "rms" or not cfg.gated_mlp or cfg.position != "rope":
        raise ValueError(f"{model_type} needs norm_type=rms, gated_mlp=True and position=rope")
    hf = {
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.activation,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "token_classification_bias": cfg.critic_head_bias,
        **rope_to_hf(cfg),
    }
    if not qwen:
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    else:
        hf.update(use_sliding_window=False)
    return hf


def llama_name_map(cfg: TransformerConfig, head: str) -> dict[str, str]:
    """{realflow parameter name: HF parameter name} for one head."""
    m = {"embed_tokens.weight": "model.embed_tokens.weight"}
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        m[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        for proj, bias in (
            ("q", cfg.qkv_bias),
            ("k", cfg.qkv_bias),
            ("v", cfg.qkv_bias),
            ("o", cfg.o_bias),
        ):
            for kind in ("weight", "bias") if bias else ("weight",):
                m[f"{ours}attn.{proj}_proj.{kind}"] = f"{theirs}self_attn.{proj}_proj.{kind}"
        m[ours + "mlp_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for proj in ("gate", "up", "down"):
            for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                m[f"{ours}mlp.{proj}_proj.{kind}"] = f"{theirs}mlp.{proj}_proj.{kind}"
    m["norm.weight"] = "model.norm.weight"
    if head == "lm":
        if not cfg.tie_word_embeddings:
            m["lm_head.weight"] = "lm_head.weight"
    else:
        m["score.weight"] = "score.weight"
        if head == "critic" and cfg.critic_head_bias:
            m["score.bias"] = "score.bias"
    return m


def _from_hf(sd: StateDict, cfg: TransformerConfig, head: str) -> StateDict:
    if "embed_tokens.weight" in sd:  # saved from a bare LlamaModel: no "model." prefix
        sd = {
            (k if k.startswith(("lm_head.", "score.")) else "model." + k): v for k, v in sd.items()
        }
    inverse = {hf: ours for ours, hf in llama_name_map(cfg, head).items()}
    return rename_state_dict(sd, inverse, _IGNORED)


def _to_hf(sd: StateDict, cfg: TransformerConfig, head: str) -> StateDict:
    tied = [r"lm_head\.weight"] if cfg.tie_word_embeddings else []
    return rename_state_dict(sd, llama_name_map(cfg, head), tied)


def _param_names(cfg: TransformerConfig, head: str) -> dict[str, list[str]]:
    return group_hf_names(llama_name_map(cfg, head))


def _modules(cfg: TransformerConfig, head: str) -> dict[str, tuple[str, int]]:
    return modules_of_name_map(llama_name_map(cfg, head))


def make_llama_like(name: str, model_type: str, class_prefix: str, qwen: bool) -> HFFamily:
    """A llama-shaped family; `qwen` selects Qwen2's bias layout and defaults."""
    defaults = QWEN2_DEFAULTS if qwen else LLAMA_DEFAULTS
    return HFFamily(
        name=name,
        model_types=(model_type,),
        architectures={
            "lm": f"{class_prefix}ForCausalLM",
            "critic": f"{class_prefix}ForTokenClassification",
            "reward": f"{class_prefix}ForSequenceClassification",
        },
        config_from_hf=partial(_config_from_hf, family=name, defaults=defaults, qwen=qwen),
        config_to_hf=partial(_config_to_hf, model_type=model_type, qwen=qwen),
        state_dict_from_hf=_from_hf,
        state_dict_to_hf=_to_hf,
        hf_param_names=_param_names,
        hf_modules=_modules,
    )


LLAMA = make_llama_like("llama", "llama", "Llama", qwen=False)
QWEN2 = make_llama_like("qwen2", "qwen2", "Qwen2", qwen=True)
