"""Metric functions: statistics of what a generate or inference call produced.

A metric is a function registered in `METRICS`:

    @METRICS.register("answer_chars")
    def answer_chars(mfc: MFCDef, data: SequenceSample, model: Model) -> dict[str, float]:
        prompts, answers, _ = decode_prompts_answers(model.tokenizer, data)
        return {"answer_chars/mean": sum(map(len, answers)) / len(answers)}

and named in the config (`metrics=[generation,scores,answer_chars]`). The worker runs every
configured metric after each generate and inference call on the call's inputs and outputs
together (`data`: the keys of the key table in realflow/api/data.py) and reports the union of
the returned stats as `<mfc>/<stat>` in metrics.jsonl. A metric returns {} when the call's
data lacks what it measures. Built in: `generation` (answer lengths, EOS rate) and `scores`
(statistics of every per-sequence float output, e.g. rewards).
"""

from __future__ import annotations

import torch

from realflow.api.data import SequenceSample
from realflow.api.dfg import MFCDef
from realflow.api.interface import Model
from realflow.api.registry import METRICS

IDS = "packed_input_ids"


@METRICS.register("generation")
def generation_stats(mfc: MFCDef, data: SequenceSample, model: Model) -> dict[str, float]:
    """Answer lengths and the EOS rate of the sequences a generate call wrote."""
    if mfc.interface_type.value != "generate" or not {IDS, "prompt_mask"} <= set(mfc.output_keys):
        return {}
    cu = data.cu_seqlens(IDS).long()
    mask = data.data["prompt_mask"].bool()
    n_prompt = torch.segment_reduce(mask.float(), "sum", offsets=cu)
    n_answer = (cu[1:] - cu[:-1]).float() - n_prompt
    stats = {
        "answer_len/mean": float(n_answer.mean()),
        "answer_len/min": float(n_answer.min()),
        "answer_len/max": float(n_answer.max()),
        "n_answer_tokens": float(n_answer.sum()),
    }
    if "no_eos_mask" in data.keys:
        stats["eos_rate"] = 1.0 - float(data.data["no_eos_mask"].float().mean())
    return stats


@METRICS.register("scores")
def score_stats(mfc: MFCDef, data: SequenceSample, model: Model) -> dict[str, float]:
    """mean/std/min/max of every output key holding one float per sequence (e.g. rewards)."""
    stats: dict[str, float] = {}
    for key in mfc.output_keys:
        if key not in data.keys or data.data[key].dtype.is_floating_point is False:
            continue
        lens = [n for per_sample in data.seqlens[key] for n in per_sample]
        if any(n != 1 for n in lens):
            continue
        x = data.data[key].float().reshape(-1)
        stats[f"{key}/mean"] = float(x.mean())
        stats[f"{key}/std"] = float(x.std()) if x.numel() > 1 else 0.0
        stats[f"{key}/min"] = float(x.min())
        stats[f"{key}/max"] = float(x.max())
    return stats
