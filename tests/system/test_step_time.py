"""`time/step_s` is the step period: the wall time between the ends of consecutive steps, read
back from trace.json (a step ends when its last call ends)."""

from __future__ import annotations

import pytest
from systest_utils import load_trace, toy_config

from realflow.system import runner
from realflow.system.toy_interfaces import ToyNode, ppo_like_nodes

pytestmark = pytest.mark.timeout(60)


def _step_ends_s(output_dir: str) -> dict[int, float]:
    """step -> when its last call ended (seconds on the trace's clock)."""
    events, _ = load_trace(output_dir)
    ends: dict[int, float] = {}
    for e in events:
        ends[e.step] = max(ends.get(e.step, 0.0), e.end / 1e6)
    return ends


@pytest.mark.parametrize(
    "nodes",
    [
        ppo_like_nodes(0.05),
        # gen of step t+1 overlaps train of step t: two steps in flight on different workers
        [
            ToyNode("gen", "gen", "generate", ["packed_prompts"], ["seq"], 0.05),
            ToyNode("score", "rew", "inference", ["seq"], ["rew"], 0.02),
            ToyNode("train", "actor", "train_step", ["seq", "rew"], [], 0.08),
        ],
    ],
    ids=["ppo_like", "overlapping_steps"],
)
def test_step_s_is_the_period_between_step_ends(tmp_path, nodes):
    cfg = toy_config(tmp_path, nodes, total_steps=5)
    rows = runner.run("toy", cfg).rows
    ends = _step_ends_s(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] == sorted(ends)
    for r in rows[1:]:
        period = ends[r["step"]] - ends[r["step"] - 1]
        # metrics.jsonl rounds to 1 us, the trace holds float microseconds
        assert r["time/step_s"] == pytest.approx(period, abs=5e-6), r
    # The first step is timed from the start of the master loop (after worker setup): no less
    # than its own calls took, measured on the trace.
    events, _ = load_trace(str(tmp_path))
    first = [e for e in events if e.step == 1]
    assert rows[0]["time/step_s"] >= (ends[1] - min(e.start for e in first) / 1e6) - 5e-6
