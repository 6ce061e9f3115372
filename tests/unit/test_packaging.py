"""The package's metadata builds without deprecation warnings (what `pip install -e .` prints)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_metadata_builds_without_licence_warnings(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("the build needs setuptools >= 77 (pip fetches it into the isolated build environment)")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    for package in ("ict_scale", "data_prep"):  # a copy of the layout, so the checkout gets no build files
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "meta").mkdir()
    done = subprocess.run([sys.executable, "-W", "default", "-c", "from setuptools import build_meta; "
                           "build_meta.prepare_metadata_for_build_wheel('meta')"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "license" not in done.stderr.lower(), done.stderr[-3000:]
    [metadata] = (tmp_path / "meta").glob("*/METADATA")
    assert "License-Expression: Apache-2.0" in metadata.read_text()
