"""`python -m realflow.search`: the table, plan.yaml, and its round trip into quickstart."""

from __future__ import annotations

import json

import pytest
import yaml

from realflow import quickstart
from realflow.api.config import apply_overrides
from realflow.experiments.ppo import PPOConfig
from realflow.models.builtin import builtin_config
from realflow.parallel.layout import Mesh
from realflow.parallel.partition import layout_errors
from realflow.search.cli import main

CLUSTER = """name: two
nodes: 1
devices_per_node: 2
device: h100
intra_node: {name: nvlink4, bandwidth_GBps: 450, latency_us: 1}
inter_node: {name: ib, bandwidth_GBps: 50, latency_us: 5}
"""


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    (d / "two.yaml").write_text(CLUSTER)
    out = d / "plan.yaml"
    args = ["ppo", f"cluster={d / 'two.yaml'}", "budget_s=1", "n_seqs=8", f"out={out}",
            f"trace={d / 'trace.json'}"]  # fmt: skip
    return main(args), out, d


def test_cli_prints_every_plan_and_writes_a_valid_allocation(plan_file, capsys):
    rc, out, d = plan_file
    assert rc == 0
    plan = yaml.safe_load(out.read_text())
    assert plan["n_seqs"] == 8  # the experiment keys it was given
    # every MFC (rew_inf scores by rule: no weights, pinned to device 0)
    assert sorted(plan["allocation"]) == sorted(
        ["actor_gen", "ref_inf", "critic_inf", "actor_train", "critic_train", "rew_inf"]
    )
    assert plan["allocation"]["rew_inf"] == "d1t1p1@0"
    tiny = builtin_config("tiny-llama", 195)
    for text in plan["allocation"].values():
        mesh = Mesh.parse(text)
        assert not layout_errors(tiny, mesh.layout)
        assert set(mesh.workers) <= {0, 1}
    trace = json.loads((d / "trace.json").read_text())
    assert {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"} >= set(
        plan["allocation"]
    ) - {"rew_inf"}
    assert plan["mode"] == "ray"  # two devices: the workers form a process group
    # the plan's experiment keys parse into the experiment config today
    keys = d / "keys.yaml"
    keys.write_text(yaml.safe_dump({k: v for k, v in plan.items() if k != "allocation"}))
    assert apply_overrides(PPOConfig, presets=[str(keys)]).n_seqs == 8


def test_quickstart_takes_the_plan_as_is(plan_file, capsys):
    rc, out, _ = plan_file
    capsys.readouterr()
    assert quickstart.main(["ppo", "--config", str(out), "--dry-run", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["allocation"] == yaml.safe_load(out.read_text())["allocation"]


def test_cli_errors_say_what_is_wrong(tmp_path, capsys):
    assert main(["ppo", "budget_s=1"]) == 2
    assert "cluster: name a cluster" in capsys.readouterr().err
    assert main(["ppo", "cluster=h100x9"]) == 2
    assert "did you mean 'h100x8'" in capsys.readouterr().err
    assert main(["ppo", "cluster=h100x8", "models.actr=llama-7b"]) == 2
    assert "unknown roles ['actr']" in capsys.readouterr().err
    assert main(["ppo", "cluster=h100x8", "n_seq=8"]) == 2
    assert "n_seqs" in capsys.readouterr().err
    assert main(["ppx", "cluster=h100x8"]) == 2
    assert "did you mean 'ppo'" in capsys.readouterr().err
