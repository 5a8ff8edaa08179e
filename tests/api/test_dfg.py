"""The dataflow graph: edges from keys, errors that name the node and the key, and export as JSON,
DOT and SVG."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from realflow.api.dfg import (
    DFGError,
    InterfaceSpec,
    InterfaceType,
    MFCDef,
    build_dfg,
    write_dfg_files,
)

SVG = "{http://www.w3.org/2000/svg}"


def mfc(name, inputs=(), outputs=(), kind="inference", model=None, **kw) -> MFCDef:
    return MFCDef(
        name=name,
        model_name=model or name.split("_")[0],
        interface_type=kind,
        interface_impl=InterfaceSpec("toy", {"alpha": 1}),
        n_seqs=4,
        input_keys=inputs,
        output_keys=outputs,
        **kw,
    )


def ppo_like() -> list[MFCDef]:
    train_in = ("ids", "logp", "ref_logp", "rewards", "values")
    return [
        mfc("actor_gen", ("prompts",), ("ids", "logp"), kind="generate"),
        mfc("rew_inf", ("ids",), ("rewards",)),
        mfc("ref_inf", ("ids",), ("ref_logp",)),
        mfc("critic_inf", ("ids",), ("values",)),
        mfc("actor_train", train_in, kind="train_step"),
        mfc("critic_train", train_in, kind="train_step"),
    ]


# ---- MFCDef ----------------------------------------------------------------------------------


def test_mfcdef_normalises_and_checks():
    m = mfc("a", ["x"], ["y"], kind="train_step")
    assert m.interface_type is InterfaceType.TRAIN_STEP and m.is_train
    assert m.input_keys == ("x",) and m.output_keys == ("y",)
    with pytest.raises(DFGError, match=r"MFC 'a': n_seqs \(0\) must be positive"):
        MFCDef("a", "m", InterfaceType.INFERENCE, InterfaceSpec("toy"), n_seqs=0)
    # A misspelled call kind names the MFC (it used to be enum's bare "'gen' is not valid").
    with pytest.raises(DFGError, match="MFC 'a': interface_type 'gen' is not one of generate"):
        MFCDef("a", "m", "gen", InterfaceSpec("toy"), n_seqs=1)


def test_mfc_to_json_fields():
    m = mfc("ref_inf", ("ids",), ("ref_logp",), output_key_remap={"logp": "ref_logp"})
    d = m.to_json()
    assert d["name"] == "ref_inf" and d["model_name"] == "ref"
    assert d["interface_type"] == "inference"
    assert d["interface_impl"] == {"type_": "toy", "args": {"alpha": 1}}
    assert d["input_keys"] == ["ids"] and d["output_keys"] == ["ref_logp"]
    assert d["n_seqs"] == 4 and d["output_key_remap"] == {"logp": "ref_logp"}
    assert d["mb_spec"] == {"n_mbs": 1, "max_tokens_per_mb": None}


# ---- building --------------------------------------------------------------------------------


def test_edges_follow_the_keys():
    dfg = build_dfg(ppo_like(), dataset_keys=["prompts"])
    mids = ["rew_inf", "ref_inf", "critic_inf"]
    trains = ["actor_train", "critic_train"]
    expected = {("actor_gen", m): ["ids"] for m in mids}
    expected |= {("actor_gen", t): ["ids", "logp"] for t in trains}
    for t in trains:
        expected |= {("rew_inf", t): ["rewards"], ("ref_inf", t): ["ref_logp"]}
        expected |= {("critic_inf", t): ["values"]}
    assert {(e["src"], e["dst"]): e["keys"] for e in dfg.edges()} == expected
    assert dfg.order == ["actor_gen", *mids, *trains]
    assert dfg.dataset_keys == frozenset({"prompts"})
    assert dfg.sources() == ["actor_gen"]
    assert dfg.producer("values") == "critic_inf" and dfg.producer("prompts") is None
    assert dfg.consumers("ids") == [*mids, *trains]
    assert dfg.mfc("ref_inf").model_name == "ref"


def test_order_is_topological_whatever_the_list_order():
    mfcs = ppo_like()[::-1]
    dfg = build_dfg(mfcs)
    pos = {n: i for i, n in enumerate(dfg.order)}
    for e in dfg.edges():
        assert pos[e["src"]] < pos[e["dst"]]
    assert [m.name for m in dfg.mfcs] == dfg.order
    assert dfg.order[0] == "actor_gen"


def test_without_dataset_keys_unwritten_keys_come_from_the_dataset():
    dfg = build_dfg([mfc("a", ("p", "q"), ("x",)), mfc("b", ("x", "r"))])
    assert dfg.dataset_keys == frozenset({"p", "q", "r"})


def test_a_missing_input_key_names_the_node_and_the_key():
    with pytest.raises(DFGError) as e:
        build_dfg([mfc("a", ("p",), ("x",)), mfc("b", ("x", "typo_key"))], dataset_keys=["p"])
    assert "MFC 'b' reads key 'typo_key', which no MFC writes and the dataset does not" in str(
        e.value
    )


def test_a_key_written_by_two_nodes_names_both_and_the_key():
    with pytest.raises(DFGError, match="key 'x' is written by both 'a' and 'b'"):
        build_dfg([mfc("a", (), ("x",)), mfc("b", (), ("x",)), mfc("c", ("x",))])


def test_a_cycle_names_the_nodes_and_keys():
    with pytest.raises(DFGError) as e:
        build_dfg([mfc("a", ("y", "p"), ("x",)), mfc("b", ("x",), ("y",))])
    msg = str(e.value)
    assert "cycle" in msg
    assert "'a' -> 'b' via ['x']" in msg and "'b' -> 'a' via ['y']" in msg


def test_a_node_reading_its_own_output():
    with pytest.raises(DFGError, match="MFC 'a' reads key 'x' that it writes itself"):
        build_dfg([mfc("a", ("x",), ("x",))])


def test_duplicate_names_and_every_key_problem_are_reported_together():
    with pytest.raises(DFGError) as e:
        build_dfg(
            [mfc("a", (), ("x",)), mfc("a", ("nope",), ("x2",)), mfc("b", (), ("x",))],
            dataset_keys=[],
        )
    msg = str(e.value)
    assert "two MFCs are named 'a'" in msg
    assert "key 'x' is written by both 'a' and 'b'" in msg
    assert "MFC 'a' reads key 'nope'" in msg


def test_dfg_errors_are_value_errors():
    assert issubclass(DFGError, ValueError)


# ---- export ----------------------------------------------------------------------------------


def test_json_export():
    dfg = build_dfg(ppo_like(), dataset_keys=["prompts"])
    d = json.loads(json.dumps(dfg.to_json()))
    assert [n["name"] for n in d["nodes"]] == dfg.order
    for node in d["nodes"]:
        assert {"name", "model_name", "interface_type", "interface_impl"} <= set(node)
        assert {"input_keys", "output_keys", "n_seqs"} <= set(node)
    assert d["edges"] == dfg.edges()
    assert all(set(e) == {"src", "dst", "keys"} for e in d["edges"])


def test_dot_mentions_every_node_and_edge():
    dfg = build_dfg(ppo_like(), dataset_keys=["prompts"])
    dot = dfg.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    for name in dfg.order:
        assert re.search(rf'^\s*"{name}" \[label=', dot, re.M), name
    for e in dfg.edges():
        line = f'"{e["src"]}" -> "{e["dst"]}" [label="{", ".join(e["keys"])}"];'
        assert line in dot
    assert 'dataset -> "actor_gen" [label="prompts"];' in dot
    assert dot.count("->") == len(dfg.edges()) + 1


def test_svg_parses_and_names_every_node():
    mfcs = [*ppo_like(), mfc("odd_<&>", ("values",), kind="train_step", model="a&b")]
    dfg = build_dfg(mfcs, dataset_keys=["prompts"])
    root = ET.fromstring(dfg.to_svg())
    assert root.tag == f"{SVG}svg"
    texts = [t.text for t in root.iter(f"{SVG}text")]
    for name in dfg.order:
        assert name in texts, name
    assert "inference on ref" in texts and "train_step on a&b" in texts
    assert len(list(root.iter(f"{SVG}line"))) == len(dfg.edges())
    assert len(list(root.iter(f"{SVG}rect"))) == len(dfg.order)


def test_svg_of_a_graph_without_edges_and_of_an_empty_one():
    root = ET.fromstring(build_dfg([mfc("solo", ("p",), kind="train_step")]).to_svg())
    assert "solo" in [t.text for t in root.iter(f"{SVG}text")]
    ET.fromstring(build_dfg([]).to_svg())  # used to fail on max() of nothing


def test_write_dfg_files(tmp_path):
    dfg = build_dfg(ppo_like(), dataset_keys=["prompts"])
    out = tmp_path / "run" / "graph"
    write_dfg_files(dfg, str(out))
    assert json.loads((out / "dfg.json").read_text()) == json.loads(json.dumps(dfg.to_json()))
    assert (out / "dfg.dot").read_text() == dfg.to_dot()
    ET.parse(out / "dfg.svg")


def test_summary_lists_nodes_and_edges():
    dfg = build_dfg(ppo_like(), dataset_keys=["prompts"])
    text = dfg.summary()
    assert text.startswith("dataset keys: prompts")
    for e in dfg.edges():
        assert f"{e['src']} -> {e['dst']}  ({', '.join(e['keys'])})" in text
