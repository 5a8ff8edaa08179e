"""Registry: double registration, misses that name the known entries and the closest one, lazy
built-ins, and loading users' plugin modules (files, module names, entry points)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from realflow.api import registry
from realflow.api.registry import EXPERIMENTS, Registry, RegistryError, closest, load_plugins

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_plugin_memory(monkeypatch):
    """Each test sees no plugin as loaded yet, and leaves the global memory as it was."""
    monkeypatch.setattr(registry, "_loaded_plugins", set())


@pytest.fixture
def gizmos(monkeypatch):
    """A registry reachable from plugin files as `realflow.api.registry.TEST_GIZMOS`."""
    reg: Registry = Registry("gizmo")
    monkeypatch.setattr(registry, "TEST_GIZMOS", reg, raising=False)
    return reg


def write_module(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


# ---- register / get ------------------------------------------------------------------------


def test_register_and_get_both_forms():
    reg: Registry = Registry("widget")

    @reg.register("deco")
    class Deco:
        pass

    class Plain:
        pass

    assert reg.register("plain", Plain) is Plain
    assert reg.get("deco") is Deco and reg.get("plain") is Plain
    assert reg.names() == ["deco", "plain"]
    assert "deco" in reg and "nope" not in reg


def test_registering_a_name_twice_is_an_error_naming_both_owners():
    reg: Registry = Registry("widget")

    class First:
        pass

    class Second:
        pass

    reg.register("w", First)
    with pytest.raises(RegistryError) as e:
        reg.register("w", Second)
    msg = str(e.value)
    assert "widget 'w' is already registered" in msg
    assert "First" in msg and "Second" in msg
    assert reg.get("w") is First  # the first registration stands


def test_registering_the_same_object_again_is_a_no_op():
    # Deliberate: re-running a register call for the very same object (not a second object under
    # the name) is harmless, so it is not reported.
    reg: Registry = Registry("widget")
    obj = object()
    reg.register("w", obj)
    reg.register("w", obj)
    assert reg.names() == ["w"]


@pytest.mark.parametrize("bad", ["", None, 3])
def test_names_must_be_non_empty_strings(bad):
    with pytest.raises(RegistryError, match="non-empty strings"):
        Registry("widget").register(bad, object())


def test_miss_lists_known_names_and_the_closest():
    reg: Registry = Registry("widget")
    for name in ("alpha", "beta", "gamma"):
        reg.register(name, object())
    with pytest.raises(RegistryError) as e:
        reg.get("alpa")
    msg = str(e.value)
    assert "unknown widget 'alpa'" in msg
    assert "Known: alpha, beta, gamma" in msg
    assert "Did you mean 'alpha'?" in msg


def test_miss_with_nothing_close_offers_no_guess():
    reg: Registry = Registry("widget")
    reg.register("alpha", object())
    msg = reg.miss_message("zzzzzz")
    assert "Known: alpha" in msg and "Did you mean" not in msg
    assert "(none)" in Registry("empty").miss_message("x")


def test_registry_errors_are_value_errors():
    assert issubclass(RegistryError, ValueError)


def test_closest():
    assert closest("kl_ctll", ["kl_ctl", "eps_clip"]) == "kl_ctl"
    assert closest("xyz", ["kl_ctl"]) is None


def test_unregister():
    reg: Registry = Registry("widget")
    reg.register("w", object())
    reg.unregister("w")
    reg.unregister("w")  # missing is fine
    assert reg.names() == []


# ---- built-ins -------------------------------------------------------------------------------


def test_builtins_load_on_first_lookup_only(tmp_path, monkeypatch, gizmos):
    write_module(
        tmp_path,
        "rf_gizmo_builtins",
        """
        from realflow.api import registry
        registry.TEST_GIZMOS.register("builtin_one", 1)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rf_gizmo_builtins", raising=False)
    gizmos._builtin_modules = ("rf_gizmo_builtins",)
    assert "rf_gizmo_builtins" not in sys.modules
    assert gizmos.get("builtin_one") == 1
    assert "rf_gizmo_builtins" in sys.modules


def test_a_plugin_cannot_take_a_builtin_name_even_before_any_lookup(tmp_path, monkeypatch, gizmos):
    write_module(
        tmp_path,
        "rf_gizmo_builtins2",
        """
        from realflow.api import registry
        registry.TEST_GIZMOS.register("taken", "builtin")
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rf_gizmo_builtins2", raising=False)
    gizmos._builtin_modules = ("rf_gizmo_builtins2",)
    with pytest.raises(RegistryError, match="'taken' is already registered"):
        gizmos.register("taken", "plugin")
    assert gizmos.get("taken") == "builtin"


def test_a_broken_builtin_module_fails_every_lookup_not_only_the_first(
    tmp_path, monkeypatch, gizmos
):
    write_module(tmp_path, "rf_gizmo_broken", "raise RuntimeError('broken built-ins')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rf_gizmo_broken", raising=False)
    gizmos._builtin_modules = ("rf_gizmo_broken",)
    with pytest.raises(RuntimeError, match="broken built-ins"):
        gizmos.names()
    # Before the fix a second lookup found an empty registry and reported "Known: (none)".
    with pytest.raises(ImportError, match="broken built-ins"):
        gizmos.names()
    with pytest.raises(ImportError):
        gizmos.get("anything")


def test_builtin_experiments_are_registered():
    assert {"sft", "rw", "dpo", "ppo", "grpo"} <= set(EXPERIMENTS.names())


def test_importing_realflow_is_cheap():
    code = (
        "import sys, realflow, realflow.api.registry, realflow.api.config, realflow.api.dfg\n"
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'transformers', "
        "'realflow.experiments') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# ---- plugins ---------------------------------------------------------------------------------


def test_plugin_file_registers_and_loads_once(tmp_path, gizmos, monkeypatch):
    path = write_module(
        tmp_path,
        "my_gizmo_plugin",
        """
        from realflow.api import registry
        registry.TEST_GIZMOS.register("from_file", "file")
        registry.TEST_GIZMOS.runs = getattr(registry.TEST_GIZMOS, "runs", 0) + 1
        """,
    )
    assert load_plugins([str(path)], entry_points=False) == [str(path)]
    assert gizmos.get("from_file") == "file"
    # The same file again, by the same spelling or another one, does not run it again.
    monkeypatch.chdir(tmp_path)
    assert load_plugins([str(path), "my_gizmo_plugin.py", "./my_gizmo_plugin.py"]) == []
    assert gizmos.runs == 1


def test_plugin_module_by_name(tmp_path, monkeypatch, gizmos):
    write_module(
        tmp_path,
        "rf_gizmo_plugin_mod",
        """
        from realflow.api import registry
        registry.TEST_GIZMOS.register("from_module", "module")
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rf_gizmo_plugin_mod", raising=False)
    assert load_plugins([" rf_gizmo_plugin_mod ", ""], entry_points=False) == [
        "rf_gizmo_plugin_mod"
    ]
    assert gizmos.get("from_module") == "module"


def test_missing_plugin_file_or_module_is_a_user_error(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        load_plugins([str(tmp_path / "nope.py")], entry_points=False)
    with pytest.raises(RegistryError, match="'rf_no_such_module' cannot be imported"):
        load_plugins(["rf_no_such_module"], entry_points=False)


def test_a_plugin_whose_own_import_fails_is_not_disguised(tmp_path, monkeypatch):
    # The plugin exists; what it imports does not: that is the plugin's bug, reported as the
    # plugin's failure with the missing module named (not as "plugin not found").
    from realflow.api.registry import PluginError

    write_module(tmp_path, "rf_plugin_bad_dep", "import rf_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as e:
        load_plugins(["rf_plugin_bad_dep"], entry_points=False)
    assert str(e.value) == (
        "plugin 'rf_plugin_bad_dep' failed while importing: ModuleNotFoundError: "
        "No module named 'rf_missing_dependency_xyz'"
    )
    assert isinstance(e.value.__cause__, ModuleNotFoundError)
    assert e.value.__cause__.name == "rf_missing_dependency_xyz"
    assert "rf_plugin_bad_dep.py" in e.value.traceback_text


def test_a_plugin_reusing_a_builtin_experiment_name_fails(tmp_path):
    path = write_module(
        tmp_path,
        "steal_ppo",
        """
        import dataclasses
        from realflow.api.registry import EXPERIMENTS
        from realflow.experiments.ppo import PPOConfig

        @EXPERIMENTS.register("ppo")
        @dataclasses.dataclass
        class MyPPO(PPOConfig):
            pass
        """,
    )
    with pytest.raises(RegistryError, match="experiment 'ppo' is already registered"):
        load_plugins([str(path)], entry_points=False)
    assert EXPERIMENTS.get("ppo").__name__ == "PPOConfig"


def test_plugin_experiment_subclassing_ppo(tmp_path):
    path = write_module(
        tmp_path,
        "my_experiment_plugin",
        """
        import dataclasses
        from realflow.api.registry import EXPERIMENTS
        from realflow.experiments.ppo import PPOConfig

        @EXPERIMENTS.register("rf_test_myexp")
        @dataclasses.dataclass
        class MyExp(PPOConfig):
            pass
        """,
    )
    try:
        load_plugins([str(path)], entry_points=False)
        cls = EXPERIMENTS.get("rf_test_myexp")
        assert [m.name for m in cls().dfg().mfcs][0] == "actor_gen"
    finally:
        EXPERIMENTS.unregister("rf_test_myexp")


def test_entry_point_plugins_load(tmp_path, monkeypatch, gizmos):
    write_module(
        tmp_path,
        "rf_gizmo_ep",
        """
        from realflow.api import registry
        registry.TEST_GIZMOS.register("from_entry_point", "ep")
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rf_gizmo_ep", raising=False)
    ep = importlib.metadata.EntryPoint(
        name="gizmo", value="rf_gizmo_ep", group=registry.ENTRY_POINT_GROUP
    )
    asked: list[str] = []

    def fake_entry_points(*, group):
        asked.append(group)
        return [ep] if group == registry.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    assert load_plugins() == ["rf_gizmo_ep"]
    assert asked == ["realflow.plugins"]
    assert gizmos.get("from_entry_point") == "ep"
    assert load_plugins() == []  # once
