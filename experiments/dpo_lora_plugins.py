"""Plugins for a DPO run with a LoRA actor (experiments/dpo_lora.yaml): a DPO loss, a metric and
a callback, each registered by name, none of them touching realflow/.

- `dpo_norm` (DPO_LOSSES): length-normalised DPO (the "dpo_norm" of Tulu 3 / open-instruct):
  the sigmoid loss on the margin of *per-token* log-ratios, so long answers do not dominate;
  `-logsigmoid(beta * ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r))` per pair.
- `ref_preference` (METRICS): on every inference call that writes sequence log-probs
  (`*seqlogp`, e.g. the reference model's `ref_seqlogp`), how often the model already prefers
  the chosen answer and by how much per token: `<mfc>/pref_acc`, `<mfc>/gap_per_token`.
- `adapter_drift` (CALLBACKS): after every checkpoint, the size of the weight change the saved
  LoRA adapter makes (`sum over modules of ||scale * B @ A||_F`), appended to
  `<output_dir>/adapter_drift.jsonl`; with `max_drift` set, it stops the run once the adapter
  has moved that far from the base weights.

    python -m realflow.quickstart dpo --config experiments/dpo_lora.yaml
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from realflow.algorithms.preference import split_interleaved_pairs
from realflow.api.callbacks import Callback, RunContext
from realflow.api.data import SequenceSample
from realflow.api.dfg import MFCDef
from realflow.api.interface import Model
from realflow.api.registry import CALLBACKS, DPO_LOSSES, METRICS
from realflow.interfaces.losses import DPOLossInput

DRIFT_FILE = "adapter_drift.jsonl"


@DPO_LOSSES.register("dpo_norm")
def dpo_norm(inp: DPOLossInput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Length-normalised DPO loss of each pair (`loss_P`), and the mean normalised margin."""
    chosen = (inp.pi_chosen_P - inp.ref_chosen_P) / inp.chosen_tokens_P.clamp(min=1)
    rejected = (inp.pi_rejected_P - inp.ref_rejected_P) / inp.rejected_tokens_P.clamp(min=1)
    margin_P = inp.beta * (chosen - rejected)
    loss_P = -F.logsigmoid(margin_P) * (1 - inp.label_smoothing)
    loss_P = loss_P - F.logsigmoid(-margin_P) * inp.label_smoothing
    return loss_P, {"norm_margin": margin_P.mean()}


@METRICS.register("ref_preference")
def ref_preference(mfc: MFCDef, data: SequenceSample, model: Model) -> dict[str, float]:
    """Of a call that writes one log-prob per sequence of [chosen, rejected, ...] pairs: the
    fraction of pairs whose chosen answer has the higher log-prob, and the mean per-token gap."""
    keys = [k for k in mfc.output_keys if k.endswith("seqlogp") and k in data.keys]
    if not keys or "prompt_mask" not in data.keys:
        return {}
    cu = data.cu_seqlens("packed_input_ids").long()
    n_prompt = torch.segment_reduce(data.data["prompt_mask"].float(), "sum", offsets=cu)
    n_answer = ((cu[1:] - cu[:-1]).float() - n_prompt).clamp(min=1)
    logp_c, logp_r = split_interleaved_pairs(data.data[keys[0]].float().reshape(-1))
    n_c, n_r = split_interleaved_pairs(n_answer)
    return {
        "pref_acc": float((logp_c > logp_r).float().mean()),
        "gap_per_token": float((logp_c / n_c - logp_r / n_r).mean()),
    }


def lora_drift(adapter_dir: str) -> list[float]:
    """`||scale * B @ A||_F` of every LoRA module in a saved peft adapter directory."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    if config["peft_type"] != "LORA" or config.get("use_dora") or config.get("rank_pattern"):
        raise ValueError(
            f"adapter_drift measures plain LoRA adapters; {adapter_dir} is "
            f"{config['peft_type']} (use_dora={config.get('use_dora')}, "
            f"rank_pattern={config.get('rank_pattern')}): use actor.lora.*"
        )
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return [
        float((scale * weights[b_name].double() @ weights[b_name.replace("lora_B", "lora_A")]
               .double()).norm())
        for b_name in sorted(k for k in weights if ".lora_B." in k)
    ]  # fmt: skip


@CALLBACKS.register("adapter_drift")
class AdapterDrift(Callback):
    """After each checkpoint, log how far `role`'s LoRA adapter moves the weights (the sum and
    the largest of the per-module `||scale * B @ A||_F`) to adapter_drift.jsonl; stop the run
    once the sum exceeds `max_drift` (0: never)."""

    def __init__(self, role: str = "actor", max_drift: float = 0.0):
        if max_drift < 0:
            raise ValueError(f"adapter_drift max_drift ({max_drift}) must be >= 0 (0: never stop)")
        self.role = role
        self.max_drift = max_drift

    def on_save(self, ctx: RunContext, step: int, path: str) -> None:
        adapter_dir = os.path.join(path, self.role)
        if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
            raise ValueError(
                f"adapter_drift: {adapter_dir} holds no adapter; train {self.role} with "
                f"{self.role}.lora.rank > 0, or set callback_args.adapter_drift.role"
            )
        drift = lora_drift(adapter_dir)
        row: dict[str, Any] = {"step": step, "drift": sum(drift), "max_module": max(drift)}
        with open(os.path.join(ctx.output_dir, DRIFT_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.max_drift and row["drift"] > self.max_drift:
            ctx.request_stop(
                f"adapter_drift: {self.role}'s adapter moved the weights by {row['drift']:.4g} "
                f"(max_drift {self.max_drift:g}) at step {step}"
            )
