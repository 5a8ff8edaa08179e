"""Strict config overrides: every problem at once with its dotted path, YAML presets in order with
the command line last, and field docs for --help."""

from __future__ import annotations

import dataclasses
import enum
import json
import typing

import pytest

from realflow.api.config import (
    ConfigError,
    apply_overrides,
    closest_key,
    describe_fields,
    field_,
    leaf_paths,
    parse_override,
    to_dict,
    type_name,
    validate,
)


class Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Inner:
    kl_ctl: float = field_(0.1, "KL penalty coefficient.", ge=0.0)
    eps_clip: float = field_(0.2, "Clip.", gt=0.0)
    lo: int = field_(0, "Lower bound.")
    hi: int = field_(10, "Upper bound.")

    def validate(self) -> list[str]:
        return [f"lo ({self.lo}) must be <= hi ({self.hi})"] if self.lo > self.hi else []


@dataclasses.dataclass
class Model:
    path: str = field_("base", "Where the weights are.")
    bf16: bool = field_(False, "bf16 autocast.")


@dataclasses.dataclass
class Cfg:
    n_seqs: int = field_(16, "Samples per step.", gt=0)
    mode: str = field_("local", "Where workers run.", choices=("local", "ray"))
    budget: int | None = field_(None, "Optional budget.")
    names: list[str] = field_(["a"], "Some names.")
    allocation: dict[str, int] = field_({}, "Role -> index.")
    color: Color = field_(Color.RED, "An enum.")
    ppo: Inner = dataclasses.field(default_factory=Inner)
    actor: Model = dataclasses.field(default_factory=lambda: Model(path="special"))

    def validate(self) -> list[str]:
        if self.ppo.hi > 0 and self.n_seqs % self.ppo.hi == 1:
            return [f"n_seqs ({self.n_seqs}) leaves one over with ppo.hi ({self.ppo.hi})"]
        return []


def problems_of(overrides=(), presets=(), cls=Cfg) -> list[str]:
    with pytest.raises(ConfigError) as e:
        apply_overrides(cls, overrides, presets)
    assert str(e.value) == "\n".join(e.value.problems)
    return e.value.problems


# ---- building and typing ---------------------------------------------------------------------


def test_no_overrides_gives_the_defaults():
    assert apply_overrides(Cfg) == Cfg()


def test_overrides_are_typed():
    cfg = apply_overrides(
        Cfg,
        [
            "n_seqs=32",
            "mode=ray",
            "ppo.kl_ctl=0.5",
            "actor.bf16=true",
            "actor.path=/ckpt/x",
            "names=[x,y]",
            "allocation.actor=1",
            "budget=7",
            "color=blue",
        ],
    )
    assert cfg.n_seqs == 32 and cfg.mode == "ray"
    assert cfg.ppo.kl_ctl == 0.5 and isinstance(cfg.ppo.kl_ctl, float)
    assert cfg.actor == Model(path="/ckpt/x", bf16=True)
    assert cfg.names == ["x", "y"] and isinstance(cfg.names, list)
    assert cfg.allocation == {"actor": 1}
    assert cfg.budget == 7 and cfg.color is Color.BLUE
    assert isinstance(cfg, Cfg) and isinstance(cfg.ppo, Inner)


def test_later_override_wins_and_int_goes_into_float_field():
    cfg = apply_overrides(Cfg, ["ppo.kl_ctl=1", "ppo.kl_ctl=2"])
    assert cfg.ppo.kl_ctl == 2.0 and isinstance(cfg.ppo.kl_ctl, float)


def test_optional_field_takes_null():
    assert apply_overrides(Cfg, ["budget=7", "budget=null"]).budget is None


def test_empty_value_sets_an_empty_string():
    assert apply_overrides(Cfg, ["actor.path="]).actor.path == ""


def test_a_parent_default_factory_is_kept():
    assert apply_overrides(Cfg, ["actor.bf16=true"]).actor.path == "special"


def test_list_defaults_are_not_shared():
    a, b = Cfg(), Cfg()
    a.names.append("z")
    a.allocation["x"] = 1
    assert b.names == ["a"] and b.allocation == {}


# ---- problems --------------------------------------------------------------------------------


def test_misspelled_key_suggests_the_closest_sibling():
    (problem,) = problems_of(["ppo.kl_ctll=0.1"])
    assert problem == "ppo.kl_ctll: unknown key; did you mean 'ppo.kl_ctl'?"


def test_misspelled_key_without_its_section_finds_the_leaf():
    (problem,) = problems_of(["kl_ctl=0.1"])
    assert "did you mean 'ppo.kl_ctl'?" in problem


def test_hopeless_key_lists_the_top_level_keys():
    (problem,) = problems_of(["qqqqqqqq=1"])
    assert problem.startswith("qqqqqqqq: unknown key; top-level keys are: ")
    assert "n_seqs" in problem and "ppo" in problem


def test_a_section_is_not_a_leaf():
    (problem,) = problems_of(["ppo=3"])
    assert problem.startswith("ppo: unknown key")


def test_every_problem_is_reported_at_once_with_its_dotted_path():
    problems = problems_of(
        [
            "ppo.kl_ctll=0.1",  # unknown key
            "n_seqs=abc",  # wrong type
            "ppo.eps_clip=-1",  # bad value (gt)
            "mode=rayy",  # not a choice
            "actor.bf16=maybe",  # wrong type, nested
            "allocation.actor=x",  # wrong type inside a dict
        ]
    )
    assert len(problems) == 6, problems
    joined = "\n".join(problems)
    assert "ppo.kl_ctll: unknown key; did you mean 'ppo.kl_ctl'?" in joined
    assert any(p.startswith("n_seqs='abc': ") for p in problems)
    assert "ppo.eps_clip: -1.0 must be > 0.0" in problems
    assert "mode: 'rayy' is not one of 'local', 'ray'; did you mean 'ray'?" in problems
    assert any(p.startswith("actor.bf16='maybe': ") for p in problems)
    assert any(p.startswith("allocation.actor='x': ") for p in problems)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("n_seqs=-4", "n_seqs: -4 must be > 0"),
        ("n_seqs=0", "n_seqs: 0 must be > 0"),
        ("ppo.kl_ctl=-0.5", "ppo.kl_ctl: -0.5 must be >= 0.0"),
    ],
)
def test_bad_values(override, expected):
    assert expected in problems_of([override])


def test_ge_accepts_the_bound_and_gt_does_not():
    assert apply_overrides(Cfg, ["ppo.kl_ctl=0"]).ppo.kl_ctl == 0.0
    assert problems_of(["ppo.eps_clip=0"]) == ["ppo.eps_clip: 0.0 must be > 0.0"]


@pytest.mark.parametrize("override", ["n_seqs=3.5", "n_seqs=true", "n_seqs=[1]", "budget=x"])
def test_wrong_types(override):
    (problem,) = problems_of([override])
    assert problem.startswith(override.split("=")[0] + "=")


def test_cross_field_rules_carry_the_dataclass_path():
    assert problems_of(["ppo.lo=5", "ppo.hi=2"]) == ["ppo.lo (5) must be <= hi (2)"]
    assert problems_of(["n_seqs=11", "ppo.hi=5"]) == ["n_seqs (11) leaves one over with ppo.hi (5)"]


@pytest.mark.parametrize("value", ["[1,2", "{", "${nope}", "'unterminated"])
def test_malformed_values_are_problems_not_crashes(value):
    # Used to escape as a raw omegaconf/yaml exception (a traceback in the CLI).
    problems = problems_of([f"ppo.kl_ctl={value}", "n_seqs=-1"])
    assert len(problems) == 2
    assert problems[0].startswith(f"ppo.kl_ctl={value!r}: ")
    assert problems[1] == "n_seqs: -1 must be > 0"


@pytest.mark.parametrize("item", ["novalue", "=3", " =3"])
def test_an_override_must_be_key_value(item):
    (problem,) = problems_of([item])
    assert "overrides are written key=value" in problem


def test_parse_override_splits_at_the_first_equals():
    assert parse_override("a.b=c=d") == ("a.b", "c=d")
    assert parse_override(" a = 1") == ("a", " 1")


def test_closest_key_prefers_siblings():
    valid = ["ppo.kl_ctl", "grpo.kl_ctl", "ppo.eps_clip"]
    assert closest_key("grpo.kl_ctll", valid) == "grpo.kl_ctl"
    assert closest_key("ppo.kl_ctll", valid) == "ppo.kl_ctl"
    assert closest_key("zzz.qqq", valid) is None


# ---- presets ---------------------------------------------------------------------------------


def test_presets_apply_in_order_and_the_command_line_wins(tmp_path):
    first = tmp_path / "first.yaml"
    first.write_text("n_seqs: 8\nppo:\n  kl_ctl: 0.3\n  hi: 20\nactor:\n  bf16: true\n")
    second = tmp_path / "second.yaml"
    second.write_text("ppo:\n  kl_ctl: 0.4\nnames: [p, q]\nallocation:\n  actor: 2\n")
    cfg = apply_overrides(Cfg, ["ppo.kl_ctl=0.9"], [str(first), str(second)])
    assert cfg.n_seqs == 8 and cfg.ppo.hi == 20 and cfg.actor.bf16
    assert cfg.actor.path == "special"  # the preset set a sibling only
    assert cfg.names == ["p", "q"] and cfg.allocation == {"actor": 2}
    assert cfg.ppo.kl_ctl == 0.9
    assert apply_overrides(Cfg, [], [str(first), str(second)]).ppo.kl_ctl == 0.4


def test_preset_problems_name_the_file_and_join_the_others(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("ppo:\n  kl_ctll: 0.3\nn_seqs: -2\n")
    problems = problems_of(["mode=x"], [str(preset)])
    assert f"ppo.kl_ctll: unknown key; did you mean 'ppo.kl_ctl'? (from {preset})" in problems
    assert "n_seqs: -2 must be > 0" in problems
    assert any(p.startswith("mode: 'x' is not one of") for p in problems)


def test_unreadable_presets(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [1, 2\n")
    listing = tmp_path / "list.yaml"
    listing.write_text("- n_seqs\n- 3\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert apply_overrides(Cfg, [], [str(empty)]) == Cfg()
    problems = problems_of([], [str(tmp_path / "missing.yaml"), str(bad_yaml), str(listing)])
    assert len(problems) == 3
    assert problems[0].startswith(f"--config {tmp_path / 'missing.yaml'}: cannot read YAML")
    assert problems[1].startswith(f"--config {bad_yaml}: cannot read YAML")
    # A list used to be ignored without a word.
    assert problems[2] == f"--config {listing}: a preset must map keys to values, got a list"


# ---- validate, describe, to_dict ---------------------------------------------------------------


def test_validate_returns_problems_without_raising():
    cfg = Cfg()
    assert validate(cfg) == []
    cfg.n_seqs, cfg.mode, cfg.ppo.lo = 0, "cloud", 99
    assert validate(cfg) == [
        "n_seqs: 0 must be > 0",
        "mode: 'cloud' is not one of 'local', 'ray'",
        "ppo.lo (99) must be <= hi (10)",
    ]


def test_leaf_paths_are_dotted():
    assert list(leaf_paths(Cfg)) == [
        "n_seqs",
        "mode",
        "budget",
        "names",
        "allocation",
        "color",
        "ppo.kl_ctl",
        "ppo.eps_clip",
        "ppo.lo",
        "ppo.hi",
        "actor.path",
        "actor.bf16",
    ]


def test_type_names():
    assert type_name(int) == "int"
    assert type_name(int | None) == "int|None"
    assert type_name(typing.Optional[int]) == "int|None"
    assert type_name(str | int) == "str|int"
    assert type_name(list[str]) == "list[str]"
    assert type_name(dict[str, int]) == "dict[str, int]"


def test_describe_fields_lists_type_default_and_doc():
    text = describe_fields(Cfg)
    assert "  ppo.kl_ctl (float, default 0.1)\n      KL penalty coefficient." in text
    assert "  mode (str, default 'local')\n      Where workers run. One of: local, ray." in text
    assert "  budget (int|None, default None)" in text
    assert "  names (list[str], default ['a'])" in text
    for path in leaf_paths(Cfg):
        assert f"  {path} (" in text


def test_describe_fields_shows_the_default_the_parent_sets():
    # `actor` is built by a default_factory that changes `path`: --help used to show 'base'.
    assert "  actor.path (str, default 'special')" in describe_fields(Cfg)


def test_describe_fields_of_a_class_with_required_fields():
    @dataclasses.dataclass
    class Required:
        must: int = field_(help="Give it.")
        may: int = field_(3, "Optional.")

    text = describe_fields(Required)
    assert "  must (int, default (required))" in text
    assert "  may (int, default 3)" in text


def test_to_dict_is_json_ready():
    d = to_dict(apply_overrides(Cfg, ["color=blue", "allocation.a=1"]))
    assert d["color"] == "blue" and d["ppo"]["kl_ctl"] == 0.1 and d["allocation"] == {"a": 1}
    assert json.loads(json.dumps(d)) == d
