"""End-to-end fixtures. The built-in `builtin:reverse-sft` model (the start of dpo, ppo, grpo and
the examples) is trained once per session, into the session's private cache (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def reverse_sft() -> str:
    """The directory of `builtin:reverse-sft`, trained now on first use (~100 SFT steps)."""
    from realflow.system.builtin_models import builtin_sft_path

    return builtin_sft_path("reverse")


@pytest.fixture(scope="session")
def examples_loaded() -> None:
    """Import the example plugins in this process (registers ppo_minilm, remax and their
    interfaces, and dpo_lora's loss, metric and callback; loading them again is a no-op)."""
    from e2e_utils import DPO_LORA_PLUGINS, PPO_MINILM, REMAX, REPO

    from realflow.api.registry import load_plugins

    plugins = [PPO_MINILM, REMAX, DPO_LORA_PLUGINS]
    load_plugins([str(REPO / p) for p in plugins], entry_points=False)
