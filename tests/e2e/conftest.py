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
    interfaces; loading them again is a no-op)."""
    from e2e_utils import PPO_MINILM, REMAX, REPO

    from realflow.api.registry import load_plugins

    load_plugins([str(REPO / PPO_MINILM), str(REPO / REMAX)], entry_points=False)
