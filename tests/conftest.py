"""Suite-wide setup.

Test files are collected with --import-mode=importlib (several folders have a test_ppo.py), so
each folder's helper modules (engine_testutils, models_testutils, ...) are put on sys.path here.
Built-in models trained on first use go to a cache private to this test session.
"""

import os
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).parent
for _sub in sorted(p for p in _HERE.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
    if str(_sub) not in sys.path:
        sys.path.insert(0, str(_sub))

os.environ.setdefault("REALFLOW_CACHE", tempfile.mkdtemp(prefix="realflow-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped on machines without a CUDA GPU (CI has none)."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu/run.sh on one)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
