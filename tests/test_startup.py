"""Start-up: ``--help`` lists the groups a user chooses from, with Hydra's own text; ``--help`` and ``--cfg job``
import nothing heavy; the ConfigStore holds only what the YAML options need (Hydra deep-copies all of it once per
group that ``--help`` lists, so every registered schema costs every ``--help``: bench/startup.py measures it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import app_checked_at_exit

from app.main import config_dir

CONF = Path(config_dir())
HEAVY = "'HEAVY', [m for m in ('torch', 'madminer', 'mlflow') if m in sys.modules]"


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", app_checked_at_exit(HEAVY), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY []" in proc.stderr, (args, proc.stderr[-2000:])  # printed at exit
    return proc


def test_help_lists_the_groups_of_conf_and_imports_nothing_heavy():
    text = _run("--help").stdout
    groups_text = text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    listed = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in groups_text.splitlines()
              if ": " in line and not line.startswith(" ")}
    folders = {p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if p.parent != CONF}
    expected = {f for f in folders if not f.startswith("hydra")}
    assert set(listed) == expected, listed
    for group in expected:  # each with its YAML options, as Hydra lists them
        assert listed[group] == ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml"))), group
    assert "training: alice, alices, carl" in text and "== Config ==" in text and "method: alices" in text


def test_cfg_job_prints_the_composed_config_and_imports_nothing_heavy():
    out = _run("training=sally", "--cfg", "job").stdout
    assert "method: sally" in out and "kind: local" in out and "n_hidden:" in out  # defaults from app.config


def test_config_store_holds_only_what_the_yaml_options_need():
    from hydra.core.config_store import ConfigStore

    import app.main  # noqa: F401 - registers the configs

    def names(node: dict, prefix: str = ""):
        for key, value in node.items():
            yield from names(value, f"{prefix}{key}/") if isinstance(value, dict) else [f"{prefix}{key}"]

    ours = {n for n in names(ConfigStore.instance().repo) if not n.startswith(("hydra/", "_dummy_empty_config_"))}
    expected = {"base_config.yaml", "toy_data_schema.yaml", "file_data_schema.yaml"}
    assert ours == expected, ours
