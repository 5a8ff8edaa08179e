"""Stats of every MFC reach metrics.jsonl: the built-in `generation` and `scores` metrics
against a direct computation, and a user's metric from a plugin file (in mode=ray too: the
plugin is loaded in every worker process)."""

from __future__ import annotations

import json

import pytest
import torch
from systest_utils import toy_config

from realflow.api.data import SequenceSample
from realflow.api.dfg import InterfaceSpec, InterfaceType, MFCDef
from realflow.interfaces.metrics import generation_stats, score_stats
from realflow.system import runner
from realflow.system.toy_interfaces import ToyNode

pytestmark = pytest.mark.timeout(180)


def _rollout() -> tuple[MFCDef, SequenceSample]:
    """Two samples: 2 and 1 sequences, prompts of 3/2/4 tokens, answers of 2/5/1 tokens."""
    prompt, answer = [3, 2, 4], [2, 5, 1]
    ids = [torch.arange(p + a) for p, a in zip(prompt, answer)]
    mask = [torch.tensor([1] * p + [0] * a, dtype=torch.bool) for p, a in zip(prompt, answer)]
    no_eos = [torch.tensor([False]), torch.tensor([True]), torch.tensor([False])]
    rewards = [torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([2.0])]
    seqs = {
        "packed_input_ids": [ids[:2], ids[2:]],
        "prompt_mask": [mask[:2], mask[2:]],
        "no_eos_mask": [no_eos[:2], no_eos[2:]],
        "rewards": [rewards[:2], rewards[2:]],
    }
    sample = SequenceSample.from_sequences(["a", "b"], seqs)
    mfc = MFCDef(
        "actor_gen",
        "actor",
        InterfaceType.GENERATE,
        InterfaceSpec("x"),
        2,
        ("packed_prompts",),
        ("packed_input_ids", "prompt_mask", "no_eos_mask"),
    )
    return mfc, sample


def test_generation_stats_match_a_direct_count():
    mfc, data = _rollout()
    assert generation_stats(mfc, data, None) == pytest.approx(
        {
            "answer_len/mean": 8 / 3,
            "answer_len/min": 1.0,
            "answer_len/max": 5.0,
            "n_answer_tokens": 8.0,
            "eos_rate": 2 / 3,
        }
    )


def test_score_stats_of_per_sequence_outputs_only():
    _, data = _rollout()
    mfc = MFCDef("rew_inf", "rew", InterfaceType.INFERENCE, InterfaceSpec("x"), 2, (), ("rewards",))
    stats = score_stats(mfc, data, None)
    x = torch.tensor([0.5, -1.0, 2.0])
    assert stats == pytest.approx(
        {
            "rewards/mean": float(x.mean()),
            "rewards/std": float(x.std()),
            "rewards/min": -1.0,
            "rewards/max": 2.0,
        }
    )
    mfc.output_keys = ("prompt_mask",)  # per-token and not float: no stats
    assert score_stats(mfc, data, None) == {}


PLUGIN = """
from realflow.api.registry import METRICS


@METRICS.register("value_sum")
def value_sum(mfc, data, model):
    return {"value_sum": float(sum(float(data.data[k].sum()) for k in mfc.output_keys))}
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "my_metric.py"
    path.write_text(PLUGIN)
    return path


@pytest.mark.parametrize(
    "mode", ["local", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])]
)
def test_inference_stats_and_a_plugin_metric_reach_the_metrics_rows(tmp_path, plugin, mode):
    from realflow.api.registry import load_plugins

    load_plugins([str(plugin)], entry_points=False)
    nodes = [
        ToyNode("gen", "actor", "generate", ["packed_prompts"], ["seq"]),
        ToyNode("score", "rew", "inference", ["seq"], ["score"]),
        ToyNode("train", "actor", "train_step", ["seq", "score"]),
    ]
    cfg = toy_config(
        tmp_path / "run",
        nodes,
        total_steps=2,
        mode=mode,
        plugins=[str(plugin)],
        metrics=["scores", "value_sum"],
    )
    runner.run("toy", cfg)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    for row in rows:
        # The toy writes 1 + the sum of each sample's first input: score = 1 + seq per sample.
        n = cfg.n_seqs
        assert row["score/score/mean"] == pytest.approx(1 + row["gen/seq/mean"])
        assert row["gen/value_sum"] == pytest.approx(n * row["gen/seq/mean"])
        assert row["score/value_sum"] == pytest.approx(n * row["score/score/mean"])
        assert row["score/score/min"] <= row["score/score/mean"] <= row["score/score/max"]
