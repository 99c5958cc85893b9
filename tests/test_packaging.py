"""Packaging and lint: a non-editable install finds its configs; ruff is clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.mark.slow
def test_wheel_ships_conf_and_runs_without_the_checkout(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("madminer_sweeper-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"app/conf/config.yaml", "app/conf/training/alices.yaml", "app/conf/experiment/quickstart.yaml"} <= names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # run from elsewhere with only the installed copy of `app` on the path (dependencies from this environment)
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r}); "
        "import app.main; assert app.main.__file__.startswith(" + repr(str(target)) + "), app.main.__file__; "
        "sys.argv = ['app', 'training=sally', '--cfg', 'job']; app.main.main()"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "method: sally" in proc.stdout and "kind: local" in proc.stdout


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    proc = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
