"""The loss and loss-scale keys of sft, dpo and rw, and the dataset a run builds: its samples
carry exactly the keys the graph expects from the dataset, and `dataset.args` reach the class."""

from __future__ import annotations

import json

import pytest

from realflow.api.config import ConfigError, apply_overrides
from realflow.api.registry import DATASETS, EXPERIMENTS, load_plugins
from realflow.data.sources import DatasetError
from realflow.data.tokenizer import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "rev 1 2 ="},
    {"role": "assistant", "content": " 2 1"},
    {"role": "user", "content": "rev 3 4 ="},
    {"role": "assistant", "content": " 4 3"},
]


def problems_of(exp: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        apply_overrides(EXPERIMENTS.get(exp), overrides)
    return e.value.problems


@pytest.fixture
def data_files(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    bad = [*CONVERSATION[:-1], {"role": "assistant", "content": " 3 4"}]
    pairs.write_text(json.dumps({"chosen": CONVERSATION, "rejected": bad}) + "\n")
    return {"sft": str(sft), "dpo": str(pairs), "rw": str(pairs)}


@pytest.mark.parametrize("exp", ["sft", "dpo", "rw"])
@pytest.mark.parametrize("rule", [None, "last_turn"])
def test_samples_carry_the_keys_the_graph_reads(exp, rule, data_files):
    overrides = [f"dataset.path={data_files[exp]}"]
    if rule and exp != "rw":
        overrides.append(f"{exp}.loss_scale={rule}")
    cfg = apply_overrides(EXPERIMENTS.get(exp), overrides)
    dfg = cfg.dfg()
    assert dfg.dataset_keys == frozenset(cfg.dataset_keys)
    sample = cfg.build_dataset(load_tokenizer("builtin"))[0]
    assert sample.keys == set(cfg.dataset_keys)
    has_scale = rule is not None and exp != "rw"
    assert ("loss_scale" in cfg.dataset_keys) == has_scale
    for mfc in dfg.mfcs:  # every MFC that reads the answer mask reads the weights too
        assert ("loss_scale" in mfc.input_keys) == has_scale


def test_interfaces_get_their_loss_by_name():
    sft = apply_overrides(EXPERIMENTS.get("sft"), ["sft.loss=nll"]).dfg()
    assert sft.mfc("actor_train").interface_impl.args == {"loss": "nll"}
    dpo = apply_overrides(EXPERIMENTS.get("dpo"), ["dpo.loss=ipo", "dpo.loss_scale=all"]).dfg()
    for name in ("ref_inf", "actor_train"):
        assert dpo.mfc(name).interface_impl.args == {
            "beta": 0.1, "loss": "ipo", "label_smoothing": 0.0}  # fmt: skip
    rw = apply_overrides(EXPERIMENTS.get("rw"), []).dfg()
    assert rw.mfc("rew_train").interface_impl.args == {"loss": "bradley_terry"}


@pytest.mark.parametrize(
    "exp, overrides, expected",
    [
        ("sft", ["sft.loss=focal"], "sft.loss: unknown sft loss 'focal'. Known: nll"),
        ("rw", ["rw.loss=bt"], "rw.loss: unknown rw loss 'bt'. Known: bradley_terry"),
        ("sft", ["sft.loss_scale=last"], "sft.loss_scale: unknown loss scale 'last'. Known: all, "
         "answer, field, last_turn, role_weights. Did you mean 'last_turn'?"),
        ("dpo", ["dpo.loss_scale=role_weights", "dpo.loss_scale_args.user=-1"],
         "dpo.loss_scale_args: role_weights: weight of 'user' must be a number >= 0, got -1"),
        ("sft", ["sft.loss_scale_args.user=1"], "sft.loss_scale_args: loss scale rule LossScale "
         "takes no arguments, got ['user']"),
        ("sft", ["dataset.args.max_length=9"], "dataset.args.max_length: set dataset.max_length instead"),
        ("sft", ["dataset.args.loss_scale=all"], "dataset.args.loss_scale: set <experiment>.loss_scale "
         "(e.g. sft.loss_scale) instead"),
    ],
)  # fmt: skip
def test_bad_loss_keys(exp, overrides, expected):
    assert expected in problems_of(exp, *overrides)


def test_losses_and_rules_from_a_plugin(tmp_path):
    plugin = tmp_path / "my_losses.py"
    plugin.write_text(
        "from realflow.api.registry import LOSS_SCALES, SFT_LOSSES\n"
        "from realflow.data.loss_scale import LossScale\n"
        "SFT_LOSSES.register('test_plugin_loss', lambda inp: -inp.logprobs_T1)\n"
        "@LOSS_SCALES.register('test_plugin_rule')\n"
        "class Rule(LossScale):\n"
        "    pass\n"
    )
    load_plugins([str(plugin)], entry_points=False)
    from realflow.api.registry import LOSS_SCALES, SFT_LOSSES

    try:
        over = ["sft.loss=test_plugin_loss", "sft.loss_scale=test_plugin_rule"]
        cfg = apply_overrides(EXPERIMENTS.get("sft"), over)
        assert cfg.dataset_kwargs()["loss_scale"] == "test_plugin_rule"
    finally:
        SFT_LOSSES.unregister("test_plugin_loss")
        LOSS_SCALES.unregister("test_plugin_rule")


def test_dataset_args_reach_a_dataset_of_your_own(tmp_path):
    seen = {}

    @DATASETS.register("test_recording")
    class Recording:
        def __init__(self, path, tokenizer, **kwargs):
            seen.update(path=path, **kwargs)

    try:
        cfg = apply_overrides(
            EXPERIMENTS.get("sft"),
            ["dataset.path=/data/x", "dataset.args.vocab=3", "dataset.args.split=dev",
             "sft.loss_scale=role_weights", "sft.loss_scale_args.user=0.5"],
        )  # fmt: skip
        cfg.dataset_type = "test_recording"  # an experiment of your own names its dataset type
        cfg.build_dataset(None)
    finally:
        DATASETS.unregister("test_recording")
    assert seen == {
        "path": "/data/x", "max_length": 256, "truncate": False, "skip_bad_rows": False,
        "vocab": 3, "split": "dev", "loss_scale": "role_weights",
        "loss_scale_args": {"user": 0.5},
    }  # fmt: skip


def test_builtin_datasets_name_their_options(data_files):
    cfg = apply_overrides(
        EXPERIMENTS.get("sft"), [f"dataset.path={data_files['sft']}", "dataset.args.n_row=3"]
    )
    with pytest.raises(DatasetError, match=r"unknown dataset options \['n_row'\].*chat_template"):
        cfg.build_dataset(load_tokenizer("builtin"))
