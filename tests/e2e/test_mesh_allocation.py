"""PPO with a mesh allocation in mode=ray: actor_train on two data-parallel workers, actor_gen on
a third, critic / reward on a fourth, ref data-parallel over the third and the fourth. Its first step must match the run with one worker per
role, the trace must show the realloc of the trained actor to the generation worker before each
later generation, and the generation copy must then hold the trained weights."""

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
    "allocation.actor_gen=d1t1p1@2",
    "allocation.ref=d2t1p1@2-3",  # two dp ranks, whose outputs actor_train reads in parts
    "allocation.critic=3",
    "allocation.rew=3",
]
# One minibatch and no advantage whitening: the batch statistics the PPO interface computes are
# then the same on each dp rank's part as on the whole batch, so dp=2 must equal dp=1.
EXACT = ["total_steps=2", "ppo.ppo_n_minibatches=1", "ppo.use_adv_norm=false"]


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
    # Generation, rewards, ref and critic run as before on step 1: the same numbers.
    for key in ref:
        if key.startswith(("actor_gen/", "critic_train/", "actor_train/reward/", "ref_inf/")):
            assert first[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-7), key
    # The dp=2 train step: gradients averaged over the dp group with the token-weighted loss
    # give the single worker's global gradient (its norm, before clipping).
    # (Its merged loss is not compared: each rank's is a mean over its own action tokens, merged
    # with the ranks' sample counts as weights.)
    assert first["actor_train/grad_norm"] == pytest.approx(ref["actor_train/grad_norm"], rel=1e-4)
    # ... and the same weights after it: the actor saved after step 2 (dp rank 0 writes it).
    got = saved_state(os.path.join(mesh_run.last_checkpoint, "actor"), "lm")
    for key, want in saved_state(os.path.join(base_run.last_checkpoint, "actor"), "lm").items():
        torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5, msg=key)

    events = trace_events(mesh_dir)
    reallocs = [e for e in events if e["name"].startswith("realloc ")]
    assert {e["name"] for e in reallocs} == {"realloc actor d2t1p1@0-1 -> d1t1p1@2"}
    assert sorted((e["tid"], e["args"]["step"]) for e in reallocs) == [(0, 2), (1, 2), (2, 2)]
    assert all(e["args"]["moved_version"] == 1 for e in reallocs)
    sent = sum(e["args"]["sent_bytes"] for e in reallocs)
    (recv,) = [e["args"]["recv_bytes"] for e in reallocs if e["tid"] == 2]
    assert sent == recv == 4 * sum(v.numel() for v in got.values())  # every fp32 weight, once
    gen2 = [e for e in events if e["name"] == "actor_gen" and e["args"]["step"] == 2]
    (gen2,) = gen2
    assert gen2["args"]["version"] == 1
    assert gen2["ts"] >= max(e["ts"] + e["dur"] for e in reallocs if e["tid"] == 2) - 1.0
    train = [e for e in events if e["name"] == "actor_train"]
    assert sorted((e["tid"], e["args"]["step"]) for e in train) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    ref_inf = [e for e in events if e["name"] == "ref_inf"]
    assert sorted((e["tid"], e["args"]["step"]) for e in ref_inf) == [
        (2, 1),
        (2, 2),
        (3, 1),
        (3, 2),
    ]
    # Step 2 generated with the weights actor_train made at step 1: the training copy computes
    # the generation's log-probs again (one minibatch, before any update) and finds ratio 1.
    assert rows[1]["actor_train/importance_ratio_max"] == pytest.approx(1.0, abs=1e-4)
