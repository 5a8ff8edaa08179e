"""The real CLI, run as users run it: `python -m realflow.quickstart ...` from the repo root.

User errors must exit 2 quickly, list every problem at once and show no traceback. The expected
graphs below are written out by hand from the algorithms, not read back from the code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "realflow.quickstart", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


def user_error(*args: str) -> str:
    """Run a command that must be refused; returns its stderr."""
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    # Refused at once: test_refusing_a_config_does_not_import_torch checks the path stays light.
    return proc.stderr


def dry_run_json(*args: str) -> dict:
    proc = run_cli(*args, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # one JSON object and nothing else on stdout
    assert set(out) == {"config", "dfg"}
    return out


def problem_lines(stderr: str) -> list[str]:
    return [line[4:] for line in stderr.splitlines() if line.startswith("  - ")]


# ---- user errors -----------------------------------------------------------------------------


def test_misspelled_key_suggests_the_valid_one():
    err = user_error("ppo", "ppo.kl_ctll=0.1")
    assert problem_lines(err) == ["ppo.kl_ctll: unknown key; did you mean 'ppo.kl_ctl'?"]
    assert "quickstart ppo --help" in err


def test_two_bad_keys_are_both_reported():
    err = user_error("ppo", "ppo.kl_ctll=0.1", "actor.bff16=true", "--dry-run")
    problems = problem_lines(err)
    assert len(problems) == 2, err
    assert "ppo.kl_ctll: unknown key; did you mean 'ppo.kl_ctl'?" in problems
    assert "actor.bff16: unknown key; did you mean 'actor.bf16'?" in problems
    assert "(2 problem(s))" in err


def test_unknown_key_wrong_type_and_bad_value_at_once():
    err = user_error("grpo", "grpo.kl_betaa=1", "n_seqs=many", "grpo.eps_clip=-0.1")
    problems = problem_lines(err)
    assert len(problems) == 3, err
    assert problems[0] == "grpo.kl_betaa: unknown key; did you mean 'grpo.kl_beta'?"
    assert problems[1].startswith("n_seqs='many': ")
    assert problems[2] == "grpo.eps_clip: -0.1 must be > 0.0"


def test_negative_values():
    err = user_error("ppo", "n_seqs=-4", "actor.max_tokens_per_mb=-1", "ppo.kl_ctl=-0.1")
    problems = problem_lines(err)
    assert "n_seqs: -4 must be > 0" in problems
    assert "actor.max_tokens_per_mb: -1 must be > 0" in problems
    assert "ppo.kl_ctl: -0.1 must be >= 0.0" in problems


def test_a_value_whose_check_divides_by_it():
    # ppo_n_minibatches=0 used to crash the divisibility rule with ZeroDivisionError.
    assert problem_lines(user_error("ppo", "ppo.ppo_n_minibatches=0")) == [
        "ppo.ppo_n_minibatches: 0 must be > 0"
    ]


def test_malformed_value_is_a_user_error():
    # Unbalanced YAML used to escape as a traceback.
    (problem,) = problem_lines(user_error("ppo", "ppo.kl_ctl=[1,2"))
    assert problem.startswith("ppo.kl_ctl='[1,2': ")


def test_an_allocation_that_leaves_out_roles_is_refused_by_dry_run(capsys):
    # allocation.actor=5 alone passed --dry-run, then the run died with a traceback. In process:
    # checking an allocation looks up the roles' reward scorers, which imports torch (seconds).
    from realflow.quickstart import main

    assert main(["ppo", "allocation.actor=5", "--dry-run"]) == 2
    assert problem_lines(capsys.readouterr().err) == [
        "allocation: gives no worker index for roles ref, rew, critic; give every role one "
        "(e.g. allocation.ref=0) or leave allocation empty for a worker per role"
    ]


@pytest.mark.slow
def test_worker_indices_with_gaps_run_like_the_default_allocation(tmp_path):
    # Indices only group roles: actor=7, ref=3 must run exactly as the default (a worker each).
    losses = []
    for name, allocation in (("gaps", ["allocation.actor=7", "allocation.ref=3"]), ("plain", [])):
        out = tmp_path / name
        args = ["total_steps=2", "n_seqs=4", "progress_bar=false", "tensorboard=false"]
        # The first run may train the built-in SFT model (minutes on a loaded machine).
        proc = run_cli("dpo", *args, *allocation, f"output_dir={out}", timeout=900)
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses.append([row["loss"] for row in rows])
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_unknown_experiment_lists_the_registered_ones_and_the_closest():
    err = user_error("ppoo", "--dry-run")
    assert "unknown experiment 'ppoo'. Did you mean 'ppo'?" in err
    assert "dapo, dpo, grpo, ppo, reinforce_pp, rloo, rw, sft" in err


def test_no_experiment_lists_them_too():
    err = user_error("--dry-run", "n_seqs=3")
    assert (
        "name an experiment" in err and "dapo, dpo, grpo, ppo, reinforce_pp, rloo, rw, sft" in err
    )


def test_unknown_option():
    assert "unknown option '--dry-runn'" in user_error("ppo", "--dry-runn")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ppo", "grpo"], "one experiment at a time"),
        (["ppo", "--config"], "--config needs a YAML file"),
        (["ppo", "=3"], "overrides are written key=value"),
        (["ppo", "plugins=[rf_no_such_plugin_module]"], "cannot be imported"),
    ],
)
def test_bad_command_lines_in_process(argv, message, capsys):
    from realflow.quickstart import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_preset_problems_name_the_preset(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("ppo:\n  kl_ctll: 0.2\n")
    err = user_error(
        "ppo", "--config", "configs/no_such_preset.yaml", "--config", str(preset), "n_seqs=-2"
    )
    problems = problem_lines(err)
    assert len(problems) == 3, err
    assert problems[0].startswith("--config configs/no_such_preset.yaml: cannot read YAML")
    assert f"ppo.kl_ctll: unknown key; did you mean 'ppo.kl_ctl'? (from {preset})" in problems
    assert "n_seqs: -2 must be > 0" in problems


def test_refusing_a_config_does_not_import_torch():
    # The deterministic form of the "exit 2 within a few seconds" requirement.
    code = (
        "import sys\n"
        "from realflow.quickstart import main\n"
        "rc = main(['ppo', 'ppo.kl_ctll=1'])\n"
        "print(rc, [m for m in ('torch', 'ray', 'deepspeed', 'transformers') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr


# ---- help ------------------------------------------------------------------------------------


def test_help_lists_fields_with_type_default_and_doc():
    proc = run_cli("ppo", "--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    row = lines.index("  ppo.kl_ctl (float, default 0.05)")
    assert "KL penalty" in lines[row + 1]
    assert "  mode (str, default 'local')" in lines
    assert "  reward.scorers (list[str], default ['task'])" in lines
    # Defaults set by the experiment, not the generic ModelConfig ones ('builtin:tiny', False).
    assert "  actor.path (str, default 'builtin:reverse-sft')" in lines
    assert "  critic.init_from_actor (bool, default True)" in lines


def test_general_help_lists_experiments():
    proc = run_cli("--help")
    assert (
        proc.returncode == 0 and "dapo, dpo, grpo, ppo, reinforce_pp, rloo, rw, sft" in proc.stdout
    )


# ---- runs ------------------------------------------------------------------------------------


def test_a_run_logged_to_a_file_has_no_progress_bar(tmp_path):
    # stderr here is a pipe, as in a job log: the bar used to redraw into it with carriage returns.
    out = tmp_path / "run"
    proc = run_cli("sft", "total_steps=3", "n_seqs=4", "tensorboard=false", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr and "s/it" not in proc.stderr
    progress = [line for line in proc.stderr.splitlines() if "realflow.system.observe: " in line]
    assert progress and "observe: steps 3/3: loss=" in progress[-1], progress  # in its place, lines
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


# ---- dry runs: the graphs --------------------------------------------------------------------

IDS, MASK, LOGP, NO_EOS = "packed_input_ids", "prompt_mask", "logprobs", "no_eos_mask"
GEN_TO_TRAIN = {IDS, MASK, LOGP, NO_EOS}

PPO_NODES = {
    "actor_gen": ("actor", "generate"),
    "rew_inf": ("rew", "inference"),
    "ref_inf": ("ref", "inference"),
    "critic_inf": ("critic", "inference"),
    "actor_train": ("actor", "train_step"),
    "critic_train": ("critic", "train_step"),
}
PPO_EDGES = {
    ("actor_gen", "rew_inf"): {IDS, MASK},  # the scorer reads the answer after the prompt
    ("actor_gen", "ref_inf"): {IDS},
    ("actor_gen", "critic_inf"): {IDS},
    ("actor_gen", "actor_train"): GEN_TO_TRAIN,
    ("actor_gen", "critic_train"): GEN_TO_TRAIN,  # KL-shaped rewards need the log-probs
    ("rew_inf", "actor_train"): {"rewards"},
    ("rew_inf", "critic_train"): {"rewards"},
    ("ref_inf", "actor_train"): {"ref_logprobs"},
    ("ref_inf", "critic_train"): {"ref_logprobs"},
    ("critic_inf", "actor_train"): {"values"},  # GAE
    ("critic_inf", "critic_train"): {"values"},  # value clipping
}
GRPO_NODES = {k: v for k, v in PPO_NODES.items() if not k.startswith("critic")}
GRPO_EDGES = {
    ("actor_gen", "rew_inf"): {IDS, MASK},
    ("actor_gen", "ref_inf"): {IDS},
    ("actor_gen", "actor_train"): GEN_TO_TRAIN,
    ("rew_inf", "actor_train"): {"rewards"},
    ("ref_inf", "actor_train"): {"ref_logprobs"},
}


def graph_of(out: dict) -> tuple[dict, dict]:
    nodes = out["dfg"]["nodes"]
    for n in nodes:
        assert {"name", "model_name", "interface_type", "interface_impl"} <= set(n)
        assert {"input_keys", "output_keys", "n_seqs"} <= set(n)
        assert n["n_seqs"] == out["config"]["n_seqs"]
    edges = out["dfg"]["edges"]
    assert all(set(e) == {"src", "dst", "keys"} for e in edges)
    node_map = {n["name"]: (n["model_name"], n["interface_type"]) for n in nodes}
    edge_map = {(e["src"], e["dst"]): set(e["keys"]) for e in edges}
    assert len(node_map) == len(nodes) and len(edge_map) == len(edges)
    return node_map, edge_map


def test_ppo_graph():
    out = dry_run_json("ppo", "n_seqs=8")
    assert out["config"]["n_seqs"] == 8
    assert graph_of(out) == (PPO_NODES, PPO_EDGES)
    nodes = {n["name"]: n for n in out["dfg"]["nodes"]}
    assert nodes["actor_gen"]["input_keys"] == ["packed_prompts"]
    assert set(nodes["actor_train"]["input_keys"]) == {
        IDS, MASK, LOGP, NO_EOS, "rewards", "ref_logprobs", "values"
    }  # fmt: skip
    assert nodes["actor_train"]["output_keys"] == []


def test_grpo_graph_has_no_critic():
    out = dry_run_json("grpo")
    assert graph_of(out) == (GRPO_NODES, GRPO_EDGES)
    assert "critic" not in out["config"]


def test_dpo_ref_inference_feeds_the_actor_training():
    out = dry_run_json("dpo")
    nodes, edges = graph_of(out)
    assert nodes == {"ref_inf": ("ref", "inference"), "actor_train": ("actor", "train_step")}
    assert list(edges) == [("ref_inf", "actor_train")]
    by_name = {n["name"]: n for n in out["dfg"]["nodes"]}
    ref_out = set(by_name["ref_inf"]["output_keys"])
    assert ref_out and edges[("ref_inf", "actor_train")] == ref_out
    for name in nodes:  # both read the pairs from the dataset
        assert {IDS, MASK} <= set(by_name[name]["input_keys"])


@pytest.mark.parametrize(
    "exp, node", [("sft", ("actor_train", "actor")), ("rw", ("rew_train", "rew"))]
)
def test_single_node_graphs(exp, node):
    out = dry_run_json(exp)
    nodes, edges = graph_of(out)
    assert nodes == {node[0]: (node[1], "train_step")} and edges == {}
    assert set(out["dfg"]["nodes"][0]["input_keys"]) == {IDS, MASK}


def test_plain_dry_run_prints_config_and_graph():
    proc = run_cli("ppo", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "experiment: ppo" in proc.stdout and "kl_ctl: 0.05" in proc.stdout
    assert "actor_gen -> critic_inf  (packed_input_ids)" in proc.stdout


# ---- presets ---------------------------------------------------------------------------------


def test_preset_applies_and_the_command_line_wins():
    preset = "configs/ppo_tiny.yaml"
    cfg = dry_run_json("ppo", "--config", preset)["config"]
    assert cfg["n_seqs"] == 4 and cfg["total_steps"] == 2
    assert cfg["ppo"]["gen"]["max_new_tokens"] == 8 and cfg["dataset"]["max_length"] == 64
    assert cfg["ppo"]["kl_ctl"] == 0.05  # untouched by the preset


def test_command_line_wins_over_presets_and_later_presets_over_earlier(tmp_path):
    second = tmp_path / "more.yaml"
    second.write_text("total_steps: 7\nppo:\n  kl_ctl: 0.2\n")
    out = dry_run_json(
        "ppo",
        "n_seqs=8",  # before the presets on the command line, and still wins
        "--config",
        "configs/ppo_tiny.yaml",
        "ppo.gen.max_new_tokens=12",
        f"--config={second}",
    )
    cfg = out["config"]
    assert cfg["n_seqs"] == 8 and cfg["ppo"]["gen"]["max_new_tokens"] == 12
    assert cfg["total_steps"] == 7 and cfg["ppo"]["kl_ctl"] == 0.2  # the later preset
    assert cfg["dataset"]["max_length"] == 64  # the first preset, where nothing overrides it
    assert {n["n_seqs"] for n in out["dfg"]["nodes"]} == {8}


# ---- plugins ---------------------------------------------------------------------------------

PLUGIN = """
    import dataclasses
    from realflow.api.registry import EXPERIMENTS
    from realflow.experiments.ppo import PPOConfig

    @EXPERIMENTS.register("myexp")
    @dataclasses.dataclass
    class MyExp(PPOConfig):
        \"\"\"PPO under another name, from a plugin file.\"\"\"
"""


def test_a_plugin_file_adds_an_experiment(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    out = dry_run_json("myexp", f"plugins=[{plugin}]", "n_seqs=8")
    assert graph_of(out) == (PPO_NODES, PPO_EDGES)
    assert out["config"]["plugins"] == [str(plugin)]
    # Its keys are validated like a built-in's, after the plugin loaded.
    err = user_error("myexp", f"plugins=[{plugin}]", "ppo.kl_ctll=1")
    assert "did you mean 'ppo.kl_ctl'?" in err


def test_a_preset_can_name_the_plugin(tmp_path):
    # `plugins:` in a preset used to be accepted but never imported.
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    preset = tmp_path / "with_plugin.yaml"
    preset.write_text(f"plugins: [{plugin}]\nn_seqs: 6\nppo:\n  ppo_n_minibatches: 3\n")
    cfg = dry_run_json("myexp", "--config", str(preset))["config"]
    assert cfg["n_seqs"] == 6 and cfg["plugins"] == [str(plugin)]


def test_a_plugin_taking_a_builtin_name_is_a_user_error(tmp_path):
    thief = tmp_path / "thief.py"
    thief.write_text(textwrap.dedent(PLUGIN).replace('"myexp"', '"ppo"'))
    assert "experiment 'ppo' is already registered" in user_error(
        "ppo", f"plugins=[{thief}]", "--dry-run"
    )
