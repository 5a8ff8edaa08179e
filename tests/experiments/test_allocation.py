"""Mesh allocations (`allocation.<mfc>=<layout>@<workers>`): parsing, validation errors, the plan
the runner and workers follow, and the layout check against the model config."""

from __future__ import annotations

import pytest

from realflow.api.config import ConfigError, apply_overrides
from realflow.experiments.allocation import mesh_plan, uses_meshes
from realflow.experiments.ppo import PPOConfig
from realflow.experiments.sft import SFTConfig
from realflow.parallel.layout import Mesh

# actor_train on two dp ranks, actor_gen on its own worker, the other roles on worker 3.
PPO_MESH = [
    "allocation.actor_gen=d1t1p1@2",
    "allocation.actor_train=d2t1p1@0-1",
    "allocation.ref=3",
    "allocation.critic=3",
    "allocation.rew=3",
]


def problems(cls: type, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        apply_overrides(cls, list(overrides))
    return info.value.problems


def test_a_mesh_allocation_gives_every_mfc_a_mesh_and_the_training_copy_a_home():
    cfg = apply_overrides(PPOConfig, [*PPO_MESH, "mode=ray"])
    plan = mesh_plan(cfg, cfg.mfcs())
    assert {n: str(m) for n, m in plan.meshes.items()} == {
        "actor_gen": "d1t1p1@2",
        "rew_inf": "d1t1p1@3",
        "ref_inf": "d1t1p1@3",
        "critic_inf": "d1t1p1@3",
        "actor_train": "d2t1p1@0-1",
        "critic_train": "d1t1p1@3",
    }
    assert plan.n_workers == 4
    assert {r: str(m) for r, m in plan.train_mesh.items()} == {
        "actor": "d2t1p1@0-1",
        "critic": "d1t1p1@3",
    }
    # Only the actor runs on a mesh besides its training mesh: one realloc, from the training copy.
    assert [(r, str(s), str(d)) for r, s, d in plan.reallocs()] == [
        ("actor", "d2t1p1@0-1", "d1t1p1@2")
    ]
    assert plan.on_worker(3) == ["rew_inf", "ref_inf", "critic_inf", "critic_train"]
    # Every worker builds the groups of every mesh, in one order.
    assert [str(m) for m in plan.mesh_order()] == ["d1t1p1@2", "d1t1p1@3", "d2t1p1@0-1"]


def test_an_mfc_entry_overrides_its_roles_worker_index():
    overrides = ["mode=ray", "allocation.actor=0", "allocation.actor_train=d2t1p1@0-1"]
    cfg = apply_overrides(SFTConfig, overrides)
    assert uses_meshes(cfg.allocation)
    plan = mesh_plan(cfg, cfg.mfcs())
    assert plan.meshes == {"actor_train": Mesh.parse("d2t1p1@0-1")}


def test_worker_indices_alone_are_not_a_mesh_allocation():
    cfg = apply_overrides(
        PPOConfig,
        ["allocation.actor=0", "allocation.ref=1"] + ["allocation.critic=1", "allocation.rew=2"],
    )
    assert not uses_meshes(cfg.allocation)


def test_mesh_allocation_errors_name_the_key_and_the_closest_valid_one():
    found = problems(
        PPOConfig,
        "mode=ray",
        "allocation.actor_gne=d1t1p1@2",  # typo of an MFC name
        "allocation.actor_train=d2t2@0-1",  # layout without p
        "allocation.ref=d2t1p1@3",  # 1 worker for 2
        "allocation.critic=-1",
        "allocation.rew=3",
    )
    assert found == [
        "allocation.actor_gne: unknown key (not an MFC or a role of this run); did you mean "
        "'allocation.actor_gen'?",
        "allocation.actor_train=d2t2@0-1: layout 'd2t2' must be written d<dp>t<tp>p<pp> with "
        "positive integers, all three in that order (e.g. d2t1p1); did you mean 'd2t2p1'?",
        "allocation.ref=d2t1p1@3: layout d2t1p1 needs dp*tp*pp = 2 workers, got 1 (3)",
        "allocation.critic: worker index (-1) must be >= 0",
        "allocation: gives no workers for MFCs actor_gen; with a <layout>@<workers> entry every "
        "MFC needs one (its own, e.g. allocation.actor_gen=d1t1p1@0, or its role's worker index)",
    ]


def test_workers_must_be_numbered_without_gaps():
    found = problems(SFTConfig, "mode=ray", "allocation.actor_train=d2t1p1@1,3")
    assert found == [
        "allocation: with <layout>@<workers> entries, workers are numbered 0..N-1 without gaps; "
        "worker(s) 0,2 run nothing (used: 1,3)"
    ]


def test_mode_local_refuses_a_multi_worker_mesh_and_a_realloc():
    found = problems(PPOConfig, *PPO_MESH)  # mode=local by default
    assert found == [
        "allocation.actor_train=d2t1p1@0-1: a mesh of 2 workers needs mode=ray (its workers "
        "form a torch.distributed group; the threads of mode=local cannot); set mode=ray",
        "allocation: actor runs on d1t1p1@2 besides its training mesh (d2t1p1@0-1); moving its "
        "weights there (realloc) needs mode=ray; set mode=ray or give its MFCs one mesh",
    ]


def test_unsupported_layouts_and_combinations_are_refused_before_anything_starts():
    found = problems(
        PPOConfig,
        "mode=ray",
        *PPO_MESH[:1],
        "allocation.actor_train=d1t2p1@0-1",
        *PPO_MESH[2:],
        "n_seqs=4",
        "allocation.critic_train=d8t1p1@3-10",
        "actor.backend=deepspeed",
        "eval_freq_steps=5",
    )
    assert found == [
        "allocation.actor_train=d1t2p1@0-1: tensor/pipeline parallel shards run on the torch "
        "engine backend (got actor.backend=deepspeed); set actor.backend=torch or use d<dp>t1p1",
        "allocation.critic_train=d8t1p1@3-10: dp (8) must be <= the MFC's n_seqs (4)",
        "allocation: actor runs on d1t1p1@2 besides its training mesh; realloc supports the "
        "torch backend without adapters or offload (got actor.backend=deepspeed, "
        "lora/peft=False, offload=False)",
        "eval_freq_steps: evaluation with a <layout>@<workers> allocation is not supported yet; "
        "set eval_freq_steps=0 or use worker indices",
    ]


def test_tensor_and_pipeline_layouts_are_accepted_where_a_shard_can_be_built():
    mesh = [
        "mode=ray",
        "allocation.actor_train=d2t1p1@0-1",
        "allocation.actor_gen=d1t2p1@2-3",
        "allocation.ref=d1t1p2@2-3",
        "allocation.critic=1",
    ]
    cfg = apply_overrides(PPOConfig, [*mesh, "allocation.rew=0"])
    plan = mesh_plan(cfg, cfg.mfcs())
    assert str(plan.meshes["actor_gen"]) == "d1t2p1@2-3"
    assert plan.reallocs() == [("actor", Mesh.parse("d2t1p1@0-1"), Mesh.parse("d1t2p1@2-3"))]
    # The built-in rule-based reward has no weights (head 'none'): nothing to shard.
    assert problems(PPOConfig, *mesh, "allocation.rew=d1t2p1@0-1") == [
        "allocation.rew_inf=d1t2p1@0-1: rew has no weights to shard (head 'none'); use d<dp>t1p1"
    ]
    assert problems(PPOConfig, *mesh, "allocation.rew=0", "ref.lora.rank=4") == [
        "allocation.ref_inf=d1t1p2@2-3: a role with adapters (lora/peft) or base_of is not "
        "sharded over tensor/pipeline parallel layouts (got layout d1t1p2); use d<dp>t1p1 for ref"
    ]
    # PPO's early stop skips minibatches by a rank-local decision: not with dp > 1.
    assert problems(PPOConfig, *mesh, "allocation.rew=0", "ppo.early_stop_kl=0.5") == [
        "allocation.actor_train=d2t1p1@0-1: early stop (early_stop_kl=0.5) decides per dp rank, "
        "which then run different numbers of collectives; set it to 0 or give the MFC dp=1"
    ]


def test_layout_errors_come_from_the_models_config():
    from realflow.experiments.allocation import MeshPlan
    from realflow.system.mesh import check_mesh_layouts

    cfg = apply_overrides(SFTConfig, ["actor.path=builtin:tiny"])  # 4 heads, 2 kv heads
    plan = MeshPlan(
        meshes={"actor_train": Mesh.parse("d1t3p1@0-2")},
        roles={"actor_train": "actor"},
        train_mesh={"actor": Mesh.parse("d1t3p1@0-2")},
    )
    with pytest.raises(ConfigError) as info:
        check_mesh_layouts(cfg, plan)
    assert info.value.problems[0] == (
        "allocation.actor_train=d1t3p1@0-2: tp (3) must divide n_heads (4) for layout d1t3p1"
    )
    good = MeshPlan(
        meshes={"actor_train": Mesh.parse("d1t2p2@0-3")},
        roles={"actor_train": "actor"},
        train_mesh={"actor": Mesh.parse("d1t2p2@0-3")},
    )
    check_mesh_layouts(cfg, good)  # tp 2 divides 4 heads, 2 kv heads, 128 units; pp 2 <= 2


def test_dry_run_shows_the_meshes_and_the_realloc_step(capsys):
    from realflow.quickstart import main

    assert main(["ppo", *PPO_MESH, "mode=ray", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  actor_gen: actor on d1t1p1@2\n" in out
    assert "  actor_train: actor on d2t1p1@0-1\n" in out
    # Every parameter of the actor (the tiny llama builtin:reverse-sft is trained from) crosses
    # to worker 2, in one message from each dp rank.
    from realflow.data.tokenizer import load_tokenizer
    from realflow.models.builtin import builtin_config
    from realflow.models.transformer import PackedTransformer

    model = PackedTransformer(builtin_config("tiny-llama", len(load_tokenizer("builtin"))))
    n = sum(p.numel() for p in model.parameters())
    assert (
        f"  realloc d2t1p1@0-1 -> d1t1p1@2: 2 messages, {n} elements between workers, 0 copied "
        "locally (actor)\n" in out
    )
