"""Adapters through the CLI's config and the runner: `<role>.lora.*` / `<role>.peft.*`,
`ref.base_of=actor` (the reference model is the actor's base weights, on the actor's worker),
checkpoints that are peft adapter directories (plus the merged model on request), and exact
resume."""

from __future__ import annotations

import os

import pytest
import torch
from e2e_utils import read_metrics, safetensors_weights, tiny_config

from realflow.api.config import ConfigError, describe_fields
from realflow.experiments.grpo import GRPOConfig
from realflow.system import runner
from realflow.system.master import RunFailure

pytestmark = pytest.mark.timeout(900)

LORA = ("actor.lora.rank=4", "actor.lora.alpha=8")


def without_time(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "time/step_s"}


def test_adapter_keys_are_documented_and_checked():
    help_text = describe_fields(GRPOConfig)
    for key in ("actor.lora.rank", "actor.lora.target_modules", "actor.peft.method",
                "actor.peft.args", "ref.base_of", "actor.save_merged", "actor.generate_merged"):  # fmt: skip
        assert key in help_text, key
    with pytest.raises(ConfigError) as err:
        tiny_config(
            "grpo",
            "unused",
            "actor.lora.rank=4",
            "actor.peft.method=doraa",
            "ref.base_of=actor",
            "ref.bf16=true",
            "allocation.actor=0",
            "allocation.ref=1",
            "allocation.rew=2",
        )
    text = "\n".join(err.value.problems)
    assert "actor.lora.rank (4) and peft.method ('doraa') both ask for adapters" in text
    assert "actor.peft.method 'doraa' unknown" in text and "did you mean 'dora'?" in text
    assert "ref.bf16 (True) must equal actor.bf16 (unset: true on a GPU, false on CPU)" in text
    assert "allocation puts ref on worker 1 and actor on 0" in text
    with pytest.raises(ConfigError, match="actor must be trained with adapters"):
        tiny_config("grpo", "unused", "ref.base_of=actor")
    with pytest.raises(ConfigError, match="adapters train biases"):
        tiny_config("grpo", "unused", *LORA, "actor.lora.bias=all", "ref.base_of=actor")


def test_base_of_on_a_role_the_run_drops_is_an_error():
    """grpo.kl_beta=0 drops ref and its node: a ref.base_of would do nothing."""
    with pytest.raises(ConfigError, match=r"ref.base_of \('actor'\): this run has no role ref"):
        tiny_config("grpo", "unused", *LORA, "ref.base_of=actor", "grpo.kl_beta=0")


def test_shared_ref_goes_on_the_actors_worker():
    cfg = tiny_config("grpo", "unused", *LORA, "ref.base_of=actor")
    where = runner.placement(cfg, cfg.dfg())
    assert where["ref"] == where["actor"]
    assert sorted(set(where.values())) == list(range(len(set(where.values()))))


@pytest.mark.slow
def test_grpo_with_the_actors_base_as_ref_equals_a_separate_ref(tmp_path, reverse_sft):
    """The shared base computes exactly what a second copy of the checkpoint computes: the runs
    log identical metrics, so the ref log-probs (and the KL) were the same at every step."""
    shared = runner.run("grpo", tiny_config("grpo", tmp_path / "a", *LORA, "ref.base_of=actor"))
    separate = runner.run("grpo", tiny_config("grpo", tmp_path / "b", *LORA))
    assert [without_time(r) for r in shared.rows] == [without_time(r) for r in separate.rows]
    assert any(r["actor_train/ref_kl"] != 0 for r in shared.rows)  # the actor left its base
    trace = (tmp_path / "a" / "trace.json").read_text()
    assert "worker 0 (actor, ref)" in trace


@pytest.mark.slow
def test_sft_lora_resumes_exactly_and_saves_peft_adapters(tmp_path, reverse_sft, monkeypatch):
    import transformers
    from peft import PeftModel

    from realflow.interfaces.sft import SFTInterface

    keys = (*LORA, "actor.save_merged=true", f"actor.path={reverse_sft}", "total_steps=4")
    fresh = runner.run("sft", tiny_config("sft", tmp_path / "fresh", *keys))

    train_step = SFTInterface.train_step
    calls = []

    def failing_train_step(self, model, data, mb_spec):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure at step 3")
        return train_step(self, model, data, mb_spec)

    out = tmp_path / "run"
    monkeypatch.setattr(SFTInterface, "train_step", failing_train_step)
    with pytest.raises(RunFailure, match="at step 3"):
        runner.run("sft", tiny_config("sft", out, *keys, "save_freq_steps=2"))
    monkeypatch.setattr(SFTInterface, "train_step", train_step)
    resumed = runner.run(
        "sft", tiny_config("sft", out, *keys, "save_freq_steps=2", "recover_mode=auto")
    )
    assert [without_time(r) for r in resumed.rows] == [without_time(r) for r in fresh.rows[2:]]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    a = safetensors_weights(os.path.join(fresh.last_checkpoint, "actor"))
    b = safetensors_weights(os.path.join(resumed.last_checkpoint, "actor"))
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)

    adapter = os.path.join(resumed.last_checkpoint, "actor")
    base = transformers.AutoModelForCausalLM.from_pretrained(reverse_sft).eval()
    ids = torch.tensor([[5, 9, 12, 7, 3, 20, 4]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        merged_model = transformers.AutoModelForCausalLM.from_pretrained(f"{adapter}/merged")
        merged = merged_model.eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=2e-5, rtol=1e-5)
    assert (adapted - base_logits).abs().max() > 1e-3
