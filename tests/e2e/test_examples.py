"""The custom-experiment examples in experiments/: each runs through the CLI with plugins=[...],
and their new pieces (the MiniLM reward interface, ReMax's greedy branch and advantages) do what
they say on hand-made batches."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from e2e_utils import (
    DPO_LORA,
    PPO_MINILM,
    QUIET,
    REMAX,
    REPO,
    assert_finite_rows,
    assert_one_trace_event_per_call,
    check_cli,
    read_metrics,
    run_cli,
    tiny_config,
)

from realflow.api.config import ConfigError
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model
from realflow.api.registry import INTERFACES

pytestmark = pytest.mark.timeout(600)

TINY_PPO = ("total_steps=2", "n_seqs=4", "ppo.gen.max_new_tokens=8", "dataset.max_length=64")
TINY_REMAX = ("total_steps=2", "n_seqs=4", "remax.gen.max_new_tokens=8", "dataset.max_length=64")


def prompt_answer_sample(rows: list[tuple[str, str, str]]) -> SequenceSample:
    """packed_input_ids + prompt_mask of (prompt, answer) texts in the built-in tokenizer, with
    the reference answer of each row as metadata `answer` (and task 'reverse')."""
    from realflow.data.tokenizer import load_tokenizer, prompt_token_ids, text_token_ids

    tok = load_tokenizer("builtin")
    ids, masks = [], []
    for prompt, answer, _ in rows:
        p, a = prompt_token_ids(tok, prompt), text_token_ids(tok, answer)
        ids.append(torch.tensor(p + a))
        masks.append(torch.tensor([True] * len(p) + [False] * len(a)))
    return SequenceSample.from_sequences(
        list(range(len(rows))),
        {"packed_input_ids": ids, "prompt_mask": masks},
        metadata={"answer": [r[2] for r in rows], "task": ["reverse"] * len(rows)},
    )


# ---- (a) ppo_minilm -----------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_minilm_cli(tmp_path, reverse_sft):
    out = tmp_path / "run"
    check_cli(
        run_cli("ppo_minilm", f"plugins=[{PPO_MINILM}]", *TINY_PPO, *QUIET, f"output_dir={out}")
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert_finite_rows(rows)
    assert all(-1.0 <= r["reward/mean"] <= 1.0 for r in rows)  # a cosine similarity
    assert_one_trace_event_per_call(
        out, ["actor_gen", "rew_inf", "ref_inf", "critic_inf", "actor_train", "critic_train"], 2
    )
    ckpt = out / "checkpoints" / "step_2"
    assert sorted(d for d in os.listdir(ckpt) if (ckpt / d).is_dir()) == ["actor", "critic"]
    dfg = json.loads((out / "dfg.json").read_text())
    rew = next(n for n in dfg["nodes"] if n["name"] == "rew_inf")
    assert rew["interface_impl"]["type_"] == "minilm_reward"


def test_ppo_minilm_config(examples_loaded):
    from realflow.api.config import describe_fields
    from realflow.api.registry import EXPERIMENTS

    keys = describe_fields(EXPERIMENTS.get("ppo_minilm"))  # what --help lists
    assert "minilm.weight" in keys and "minilm.task_weight" in keys and "ppo.kl_ctl" in keys
    cfg = tiny_config("ppo_minilm", "unused", "minilm.weight=2.0", "minilm.task_weight=0.5")
    assert cfg.roles()["rew"].head == "none"  # no reward model is loaded
    rew = cfg.dfg().mfc("rew_inf")
    assert rew.interface_impl.type_ == "minilm_reward"
    assert rew.interface_impl.args == {"model_path": "", "weight": 2.0, "task_weight": 0.5}
    with pytest.raises(ConfigError) as e:
        tiny_config("ppo_minilm", "unused", "reward.scorers=[model]", "minilm.model_path=/nope")
    assert len(e.value.problems) == 2
    assert any("reward.* is unused" in p for p in e.value.problems)
    assert any("minilm.model_path" in p and "/nope" in p for p in e.value.problems)


def test_minilm_reward_scores_similarity_to_the_reference(examples_loaded):
    from realflow.data.tokenizer import load_tokenizer

    rows = [
        ("rev 1 2 3 =", " 3 2 1", " 3 2 1"),  # the reference itself: cosine 1
        ("rev 1 2 3 =", " 9", " 3 2 1"),
        ("rev 4 5 =", " 5 4", " 5 4"),
    ]
    data = prompt_answer_sample(rows)
    model = Model("rew", None, tokenizer=load_tokenizer("builtin"))
    mb = MicroBatchSpec()
    cls = INTERFACES.get("minilm_reward")
    sim = cls().inference(model, data, mb).data["rewards"]
    assert sim.shape == (3,) and sim.dtype == torch.float32
    assert sim[0] == pytest.approx(1.0, abs=1e-5) and sim[2] == pytest.approx(1.0, abs=1e-5)
    assert sim[1] < 0.99

    mixed = cls(weight=2.0, task_weight=0.5).inference(model, data, mb).data["rewards"]
    task = INTERFACES.get("reward")(["task"]).inference(model, data, mb).data["rewards"]
    assert task[0] == 1.0 and task[1] < 1.0
    torch.testing.assert_close(mixed, 2.0 * sim + 0.5 * task)


# ---- (b) remax ----------------------------------------------------------------------------------


def test_remax_dry_run_shows_the_greedy_branch():
    proc = run_cli("remax", f"plugins=[{REMAX}]", "--dry-run", "--json")
    dfg = json.loads(check_cli(proc))["dfg"]
    nodes = {n["name"]: n for n in dfg["nodes"]}
    assert list(nodes) == [
        "actor_gen",
        "actor_greedy_gen",
        "rew_inf",
        "greedy_rew_inf",
        "ref_inf",
        "actor_train",
    ]
    assert {n["model_name"] for n in nodes.values()} == {"actor", "rew", "ref"}  # no critic
    assert nodes["actor_greedy_gen"]["interface_impl"]["args"]["gen"]["greedy"] is True
    assert nodes["actor_gen"]["interface_impl"]["args"]["gen"]["greedy"] is False
    edges = {(e["src"], e["dst"]): e["keys"] for e in dfg["edges"]}
    assert edges[("actor_greedy_gen", "greedy_rew_inf")] == [
        "greedy_input_ids",
        "greedy_prompt_mask",
    ]
    assert edges[("greedy_rew_inf", "actor_train")] == ["greedy_rewards"]
    assert edges[("rew_inf", "actor_train")] == ["rewards"]

    text = check_cli(run_cli("remax", f"plugins=[{REMAX}]", "--dry-run"))
    assert "actor_greedy_gen -> greedy_rew_inf  (greedy_input_ids, greedy_prompt_mask)" in text


@pytest.mark.slow
def test_remax_cli(tmp_path, reverse_sft):
    out = tmp_path / "run"
    check_cli(run_cli("remax", f"plugins=[{REMAX}]", *TINY_REMAX, *QUIET, f"output_dir={out}"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert_finite_rows(rows)
    for r in rows:
        assert r["advantages/mean"] == pytest.approx(r["reward/mean"] - r["reward/greedy_mean"])
    mfcs = ["actor_gen", "actor_greedy_gen", "rew_inf", "greedy_rew_inf", "ref_inf", "actor_train"]
    assert_one_trace_event_per_call(out, mfcs, 2)
    assert os.path.isfile(out / "checkpoints" / "step_2" / "actor" / "config.json")


def test_remax_greedy_baseline_is_the_greedy_answer(tmp_path, reverse_sft, examples_loaded):
    """In a run, greedy_rewards are the task scores of the actor's greedy answers: with a greedy
    sampled branch too (a config the experiment refuses, so built here by hand) both branches
    give the same answers and every advantage is exactly 0, so only the KL term trains."""
    from realflow.system.runner import run

    cfg = tiny_config("remax", tmp_path, *TINY_REMAX)
    cfg.remax.gen.greedy = True  # bypasses validation on purpose
    rows = run("remax", cfg).rows
    assert len(rows) == 2
    for r in rows:
        assert r["reward/mean"] == r["reward/greedy_mean"]
        assert r["advantages/abs_mean"] == 0.0 and r["pg_loss"] == 0.0


def test_remax_advantages_are_sample_minus_greedy(examples_loaded):
    rows = [("rev 1 2 =", " 2 1", " 2 1"), ("rev 3 4 5 =", " 5 4 3 9", " 5 4 3")]
    data = prompt_answer_sample(rows)
    extra = SequenceSample.from_sequences(
        data.ids,
        {
            "rewards": [torch.tensor([1.0]), torch.tensor([0.25])],
            "greedy_rewards": [torch.tensor([0.5]), torch.tensor([1.0])],
            "no_eos_mask": [torch.tensor([False]), torch.tensor([False])],
            "greedy_no_eos_mask": [torch.tensor([False]), torch.tensor([True])],
        },
    )
    data.update_(extra)
    iface = INTERFACES.get("remax_actor")()
    adv_T1, stats = iface.advantages(data)
    # T1 layout: L-1 positions per sequence; position t predicts token t+1
    masks = data.data["prompt_mask"].split(data.flat_seqlens("prompt_mask"))
    expected = torch.cat([(~m[1:]).float() * a for m, a in zip(masks, [0.5, -0.75])])
    assert (expected != 0).sum() == 2 + 4  # answer tokens " 2 1" and " 5 4 3 9"
    torch.testing.assert_close(adv_T1, expected)
    assert stats["reward/greedy_mean"] == 0.75 and stats["advantages/mean"] == -0.125

    # an answer without EOS scores 0 on either branch when mask_no_eos_with_zero
    masked = INTERFACES.get("remax_actor")(mask_no_eos_with_zero=True)
    adv_T1, _ = masked.advantages(data)
    assert adv_T1[-1] == pytest.approx(0.25)  # 0.25 - 0


def test_remax_refuses_a_greedy_sampled_branch(examples_loaded):
    with pytest.raises(ConfigError, match="remax.gen.greedy"):
        tiny_config("remax", "unused", "remax.gen.greedy=true")
    with pytest.raises(ConfigError, match=r"remax.n_minibatches \(3\) must divide n_seqs \(4\)"):
        tiny_config("remax", "unused", "n_seqs=4", "remax.n_minibatches=3")


# ---- (c) dpo_lora: a LoRA actor, its base as ref, and a loss, a metric and a callback ----------

EVAL_PAIRS = [
    ("rev 1 2 3 =", " 3 2 1", " 1 2 3"),
    ("rev 4 7 1 2 =", " 2 1 7 4", " 2 1 7"),
    ("rev 9 8 7 6 5 =", " 5 6 7 8 9", " 5 6 7 8 9 9 9"),
    ("rev 3 3 5 =", " 5 3 3", " 3 5 3"),
]


def hf_answer_logps(model, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the answer tokens' log-probs of every sequence (plain transformers), and the
    number of answer tokens: [chosen, rejected] of each sample in turn."""
    logps, counts = [], []
    with torch.no_grad():
        for s in samples:
            cu = s.cu_seqlens("packed_input_ids").tolist()
            for a, b in zip(cu[:-1], cu[1:]):
                ids = s.data["packed_input_ids"][a:b]
                answer = ~s.data["prompt_mask"][a:b].bool()
                logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)
                token_logp = logp.gather(1, ids[1:, None])[:, 0]
                logps.append(token_logp[answer[1:]].sum())
                counts.append(answer[1:].sum().double())
    return torch.stack(logps), torch.stack(counts)


def lora_deltas(base_dir: str, adapter_dir: str) -> list[float]:
    """||W_merged - W_base||_F of every weight peft's merge changes (transformers + peft)."""
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    deltas = {k: float((merged[k].double() - before[k].double()).norm()) for k in before}
    return sorted(d for d in deltas.values() if d > 0)


def test_dpo_lora_dry_run_uses_the_plugins():
    dfg = json.loads(check_cli(run_cli("dpo", "--config", DPO_LORA, "--dry-run", "--json")))
    cfg = dfg["config"]
    assert cfg["actor"]["lora"]["rank"] == 8 and cfg["ref"]["base_of"] == "actor"
    assert cfg["dpo"]["loss"] == "dpo_norm" and cfg["callbacks"] == ["adapter_drift"]
    assert "ref_preference" in cfg["metrics"]


@pytest.mark.slow
def test_dpo_lora_plugins_take_effect(tmp_path, reverse_sft, examples_loaded, monkeypatch):
    """A small run of experiments/dpo_lora.yaml: eval/loss is the length-normalised DPO loss
    that transformers + peft compute from the step's adapter (the actor) and the base checkpoint
    (the ref); the metric, on the eval's ref call, is the base model's preference on the eval
    pairs computed by transformers; the callback's drift file holds the weight change
    peft's merge makes, and its max_drift stopped the run; the actor's base weights are bit for
    bit those it started from while its adapter moved."""
    import transformers
    from peft import PeftModel

    import realflow.engines.tuners as tuners
    from realflow.api.config import apply_overrides
    from realflow.data.tokenizer import load_tokenizer
    from realflow.experiments.dpo import DPOConfig
    from realflow.system.runner import run

    built = []
    apply_adapters = tuners.apply_adapters

    def recording_apply_adapters(module, spec, seed, base_path):
        built.append((module, {k: v.clone() for k, v in module.state_dict().items()}))
        return apply_adapters(module, spec, seed, base_path)

    monkeypatch.setattr(tuners, "apply_adapters", recording_apply_adapters)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in EVAL_PAIRS
        )
    )
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}", *QUIET, "total_steps=6", "n_seqs=4", "save_freq_steps=1",
        "eval_freq_steps=1", f"eval_dataset.path={pairs}",
        "callback_args.adapter_drift.max_drift=1e-9",
    ]  # fmt: skip
    cfg = apply_overrides(DPOConfig, overrides, [str(REPO / DPO_LORA)])
    result = run("dpo", cfg)
    rows = read_metrics(out)

    # the callback: it stopped the run after the first checkpoint, and logged every save
    assert "adapter_drift" in result.stop_reason and len(rows) < 6
    saved = sorted(
        int(d.split("_")[1]) for d in os.listdir(out / "checkpoints") if d.startswith("step_")
    )
    drift = [json.loads(line) for line in (out / "adapter_drift.jsonl").read_text().splitlines()]
    assert [d["step"] for d in drift] == saved and saved[0] == 1
    for d in drift:
        deltas = lora_deltas(reverse_sft, str(out / "checkpoints" / f"step_{d['step']}" / "actor"))
        assert d["drift"] == pytest.approx(sum(deltas), rel=1e-4)
        assert d["max_module"] == pytest.approx(max(deltas), rel=1e-4)

    # the metric, on ref_inf
    for r in rows:
        assert 0.0 <= r["ref_inf/pref_acc"] <= 1.0 and math.isfinite(r["ref_inf/gap_per_token"])

    # the loss: step 1 starts from LoRA's B = 0 (actor == ref: margin 0, loss log 2); eval/loss
    # of each step against transformers + peft on the step's checkpoint
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["norm_margin"] == 0
    dataset = cfg.build_dataset(load_tokenizer("builtin"), str(pairs))
    samples = [dataset[i] for i in range(len(dataset))]
    assert len(samples) == len(EVAL_PAIRS)
    base = transformers.AutoModelForCausalLM.from_pretrained(reverse_sft).eval()
    ref_logp, n = hf_answer_logps(base, samples)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == saved
    # the metric on the eval's ref call: the base model's preferences on the eval pairs
    per_token = ref_logp / n
    for r in evals:
        acc = float((ref_logp[0::2] > ref_logp[1::2]).double().mean())
        assert r["eval/eval_ref_inf/pref_acc"] == acc
        gap = float((per_token[0::2] - per_token[1::2]).mean())
        assert r["eval/eval_ref_inf/gap_per_token"] == pytest.approx(gap, rel=1e-4)
    for r in evals:
        adapter = out / "checkpoints" / f"step_{r['step']}" / "actor"
        actor = PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(reverse_sft), adapter
        ).eval()
        pi_logp, _ = hf_answer_logps(actor, samples)
        ratio = (pi_logp - ref_logp) / n
        margin = cfg.dpo.beta * (ratio[0::2] - ratio[1::2])
        want = float(-torch.nn.functional.logsigmoid(margin).mean())
        assert r["eval/loss"] == pytest.approx(want, rel=1e-4)
        assert r["eval/loss"] != pytest.approx(math.log(2), abs=1e-6)  # the adapter did move

    # the base weights did not change, bit for bit; the adapter did
    ((module, initial),) = built
    live = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items()}
    assert all(torch.equal(live[k], v) for k, v in initial.items())
    lora_b = [p for k, p in module.named_parameters() if "lora_B" in k]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B starts at zero


def test_dpo_lora_plugins_on_hand_made_pairs(examples_loaded):
    from realflow.api.dfg import InterfaceSpec, InterfaceType, MFCDef
    from realflow.api.registry import CALLBACKS, DPO_LOSSES, METRICS
    from realflow.interfaces.losses import DPOLossInput

    # the loss: per pair, against the formula
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    inp = DPOLossInput(t(-4.0, -9.0), t(-6.0, -3.0), t(-5.0, -8.0), t(-5.0, -4.0), t(2, 3), t(4, 1),
                       0.5, 0.0)  # fmt: skip
    loss, stats = DPO_LOSSES.get("dpo_norm")(inp)
    margins = [0.5 * ((-4 + 5) / 2 - (-6 + 5) / 4), 0.5 * ((-9 + 8) / 3 - (-3 + 4) / 1)]
    want = [math.log1p(math.exp(-m)) for m in margins]
    torch.testing.assert_close(loss, t(*want))
    assert float(stats["norm_margin"]) == pytest.approx(sum(margins) / 2)

    # the metric: a ref_inf-like call over two pairs
    data = prompt_answer_sample(
        [
            ("rev 1 2 =", " 2 1", ""),
            ("rev 1 2 =", " 1", ""),
            ("rev 3 =", " 3 3", ""),
            ("rev 3 =", " 3", ""),
        ]
    )
    data.update_(
        SequenceSample.from_sequences(
            data.ids, {"ref_seqlogp": [torch.tensor([x]) for x in (-1.0, -3.0, -6.0, -1.0)]}
        )
    )
    mfc = MFCDef(
        "ref_inf",
        "ref",
        InterfaceType.INFERENCE,
        InterfaceSpec("dpo"),
        4,
        output_keys=("ref_seqlogp",),
    )
    got = METRICS.get("ref_preference")(mfc, data, Model("ref", None))
    masks = data.data["prompt_mask"].split(data.flat_seqlens("prompt_mask"))
    n = [float((~m.bool()).sum()) for m in masks]
    logp = [-1.0, -3.0, -6.0, -1.0]
    gaps = [logp[0] / n[0] - logp[1] / n[1], logp[2] / n[2] - logp[3] / n[3]]
    assert got == {"pref_acc": 0.5, "gap_per_token": pytest.approx(sum(gaps) / 2)}
    no_logp = MFCDef(
        "actor_gen", "actor", InterfaceType.GENERATE, InterfaceSpec("x"), 4, output_keys=("x",)
    )
    assert METRICS.get("ref_preference")(no_logp, data, Model("ref", None)) == {}

    # the callback's arguments are checked
    with pytest.raises(ValueError, match="max_drift"):
        CALLBACKS.get("adapter_drift")(max_drift=-1.0)
