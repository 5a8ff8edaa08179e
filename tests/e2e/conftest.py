"""End-to-end fixtures. The built-in `builtin:reverse-sft` model (the start of dpo, ppo, grpo and
the examples) is trained once per session, into the session's private cache (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def reverse_sft() -> str:
    """The directory of `builtin:reverse-sft`, trained now on first use (~100 SFT steps)."""
    from realflow.system.builtin_models import builtin_sft_path

    return builtin_sft_path("reverse")


@pytest.fixture(scope="module")
def examples_loaded() -> Iterator[None]:
    """Import the example plugins in this process (registers ppo_minilm, remax and their
    interfaces, and dpo_lora's loss, metric and callback) for one test module; afterwards every
    registry holds what it held before, so later tests see only the built-in entries."""
    from e2e_utils import DPO_LORA_PLUGINS, PPO_MINILM, REMAX, REPO

    from realflow.api import registry

    registries = [r for r in vars(registry).values() if isinstance(r, registry.Registry)]
    for r in registries:
        r._load_builtins()  # loaded now, so that the snapshot holds them
    saved = [dict(r._entries) for r in registries]
    saved_loaded = set(registry._loaded_plugins)
    plugins = [PPO_MINILM, REMAX, DPO_LORA_PLUGINS]
    registry.load_plugins([str(REPO / p) for p in plugins], entry_points=False)
    yield
    for r, entries in zip(registries, saved):
        r._entries.clear()
        r._entries.update(entries)
    registry._loaded_plugins.clear()
    registry._loaded_plugins.update(saved_loaded)
