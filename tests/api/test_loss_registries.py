"""The loss and loss-scale registries list their built-in names truly, and checking a config's
names imports neither torch nor the losses."""

import subprocess
import sys

import pytest

from realflow.api.registry import DPO_LOSSES, LOSS_SCALES, RW_LOSSES, SFT_LOSSES


@pytest.mark.parametrize("registry", [SFT_LOSSES, DPO_LOSSES, RW_LOSSES, LOSS_SCALES])
def test_declared_builtin_names_match_what_the_modules_register(registry):
    declared = set(registry._builtin_names)
    registry._load_builtins()
    registered = {
        n for n, obj in registry._entries.items() if obj.__module__.startswith("realflow.")
    }
    assert registered == declared


def test_checking_loss_names_imports_no_torch():
    code = (
        "import sys\n"
        "from realflow.api.config import apply_overrides\n"
        "from realflow.experiments.dpo import DPOConfig\n"
        "apply_overrides(DPOConfig, ['dpo.loss=ipo', 'dpo.loss_scale=role_weights',\n"
        "                            'dpo.loss_scale_args.user=0.5'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
