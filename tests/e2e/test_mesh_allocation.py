"""PPO with a mesh allocation in mode=ray on four workers: actor_train data-parallel on workers
0-1 (d2t1p1), actor_gen tensor-parallel on workers 2-3 (d1t2p1), ref data-parallel over 2-3,
the critic pipeline-parallel on 0-1 (d1t1p2: trained and saved as two stages), the rule-based
reward on 3. Its first step must match the run with one worker per role, the trace must show
the realloc of the trained actor to the generation shards before each later generation (moving
the bytes its plan says), and the generation copy must then hold the trained weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from e2e_utils import read_metrics, saved_state, tiny_config

from realflow.system.runner import run

MESH = [
    "mode=ray",
    "allocation.actor_train=d2t1p1@0-1",
    "allocation.actor_gen=d1t2p1@2-3",  # tp=2 generation, refilled by realloc from 0-1
    "allocation.ref=d2t1p1@2-3",  # two dp ranks, whose outputs actor_train reads in parts
    "allocation.critic=d1t1p2@0-1",  # two pipeline stages, trained in place (no realloc)
    "allocation.rew=3",
]
# One minibatch: each dp rank then trains on its part of the whole batch's only minibatch, and
# the batch statistics (advantage whitening) are all-gathered over the dp group, so dp=2 must
# equal dp=1.
EXACT = ["total_steps=2", "ppo.ppo_n_minibatches=1"]


def trace_events(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "trace.json")) as f:
        return [e for e in json.load(f)["traceEvents"] if e["ph"] == "X"]


@pytest.mark.slow  # two SFT runs: ~15-25 s here
def test_one_worker_meshes_in_mode_local_run_like_worker_indices(tmp_path):
    """MFC-level entries that keep each role on one worker change nothing: same metrics."""
    args = ["actor.path=builtin:tiny", "n_seqs=4"]
    plain = run("sft", tiny_config("sft", tmp_path / "plain", *args, "allocation.actor=0"))
    mesh = run(
        "sft", tiny_config("sft", tmp_path / "mesh", *args, "allocation.actor_train=d1t1p1@0")
    )
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k} for r in rows]  # noqa: E731
    assert strip(read_metrics(mesh.output_dir)) == strip(read_metrics(plain.output_dir))
    assert len(plain.rows) == 2


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ppo_on_meshes_matches_one_worker_per_role_and_reallocates(tmp_path, reverse_sft):
    pytest.importorskip("ray")
    base_run = run("ppo", tiny_config("ppo", tmp_path / "base", *EXACT))
    mesh_run = run("ppo", tiny_config("ppo", tmp_path / "mesh", *EXACT, *MESH))
    base, mesh_dir = read_metrics(base_run.output_dir), mesh_run.output_dir
    rows = read_metrics(mesh_dir)
    assert [r["step"] for r in rows] == [1, 2]
    first, ref = rows[0], base[0]
    # Generation, rewards, ref and critic compute what one worker does on step 1 (tp=2 and
    # pp=2 sum in another order: float rounding only; the same sampled tokens).
    for key in ref:
        if key.startswith(("actor_gen/", "critic_train/", "actor_train/reward/", "ref_inf/")):
            assert first[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    # The dp=2 train step: gradients averaged over the dp group with the token-weighted loss
    # give the single worker's global gradient (its norm, before clipping), and its merged
    # loss (each rank's a mean over its own action tokens, merged by token counts) the whole
    # batch's.
    assert first["actor_train/grad_norm"] == pytest.approx(ref["actor_train/grad_norm"], rel=1e-4)
    assert first["actor_train/loss"] == pytest.approx(ref["actor_train/loss"], rel=1e-4, abs=1e-6)
    # ... and the same weights after it: the actor saved after step 2 (dp rank 0 writes it), and
    # the critic gathered from its two stages (both call save, worker 0 writes).
    got = saved_state(os.path.join(mesh_run.last_checkpoint, "actor"), "lm")
    for role, head, state in [("actor", "lm", got), ("critic", "critic", None)]:
        state = state or saved_state(os.path.join(mesh_run.last_checkpoint, role), head)
        want = saved_state(os.path.join(base_run.last_checkpoint, role), head)
        assert state.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(state[key], want[key], rtol=1e-4, atol=1e-5, msg=key)

    events = trace_events(mesh_dir)
    reallocs = [e for e in events if e["name"].startswith("realloc ")]
    assert {e["name"] for e in reallocs} == {"realloc actor d2t1p1@0-1 -> d1t2p1@2-3"}
    assert sorted((e["tid"], e["args"]["step"]) for e in reallocs) == [(w, 2) for w in range(4)]
    assert all(e["args"]["moved_version"] == 1 for e in reallocs)
    # Bytes moved: what the plan says (fp32), each tp shard its half of every split weight and
    # the replicated ones whole, all from the other mesh (nothing local).
    plan = plan_for(mesh_run.last_checkpoint, "d2t1p1@0-1", "d1t2p1@2-3")
    sent = sum(e["args"]["sent_bytes"] for e in reallocs)
    recv = sum(e["args"]["recv_bytes"] for e in reallocs)
    assert sent == recv == 4 * plan.remote_numel()
    assert all(e["args"]["local_bytes"] == 0 for e in reallocs)
    whole = sum(v.numel() for v in got.values())
    assert whole < plan.remote_numel() < 2 * whole  # a split, not two whole copies
    gen2 = [e for e in events if e["name"] == "actor_gen" and e["args"]["step"] == 2]
    assert sorted(e["tid"] for e in gen2) == [2, 3]
    assert all(e["args"]["version"] == 1 for e in gen2)
    for gen in gen2:  # each generation shard ran after its part of the realloc
        (moved,) = [e for e in reallocs if e["tid"] == gen["tid"]]
        assert gen["ts"] >= moved["ts"] + moved["dur"] - 1.0
    train = [e for e in events if e["name"] == "actor_train"]
    assert sorted((e["tid"], e["args"]["step"]) for e in train) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for name, workers in [("ref_inf", (2, 3)), ("critic_train", (0, 1))]:
        calls = [e for e in events if e["name"] == name]
        assert sorted((e["tid"], e["args"]["step"]) for e in calls) == [
            (w, s) for w in workers for s in (1, 2)
        ], name
    # Step 2 generated with the weights actor_train made at step 1: the training copy computes
    # the generation's log-probs again (one minibatch, before any update) and finds ratio 1.
    assert rows[1]["actor_train/importance_ratio_max"] == pytest.approx(1.0, abs=1e-4)


def plan_for(checkpoint: str, src: str, dst: str):
    """The realloc plan of the saved actor's config between two meshes."""
    from realflow.models.hf_io import config_from_hf_dir
    from realflow.parallel.layout import Mesh
    from realflow.parallel.realloc import plan_realloc

    config = config_from_hf_dir(os.path.join(checkpoint, "actor"))
    return plan_realloc(config, "lm", Mesh.parse(src), Mesh.parse(dst))
