"""Registries that list their built-in names without importing them must list them truly."""

import subprocess
import sys

from realflow.api.registry import REWARD_SCORERS


def test_declared_builtin_names_match_what_the_modules_register():
    declared = set(REWARD_SCORERS._builtin_names)
    REWARD_SCORERS._load_builtins()
    assert declared <= set(REWARD_SCORERS._entries)
    registered_by_builtins = {
        n for n, obj in REWARD_SCORERS._entries.items() if obj.__module__.startswith("realflow.")
    }
    assert registered_by_builtins == declared


def test_checking_scorer_names_imports_no_torch():
    code = (
        "import sys\n"
        "from realflow.api.registry import REWARD_SCORERS\n"
        "assert 'task' in REWARD_SCORERS and 'tsk' not in REWARD_SCORERS\n"
        "assert 'model' in REWARD_SCORERS.names()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
