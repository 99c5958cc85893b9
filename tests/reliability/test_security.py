"""Security: servers bind 127.0.0.1, MLproject parameters are data, model files hold tensors only."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY

# Commands that start a server, as written in docs (`mlflow ui ...`) or in code (["mlflow", "server", ...]).
SERVER_COMMAND = re.compile(
    r"""mlflow["',\s]+(?:ui|server)\b|mlflow["',\s]+models["',\s]+serve\b|optuna-dashboard""", re.IGNORECASE
)
HOST = re.compile(r"""--host["',\s=]+([\w.:\-]+)""")
LOCAL = {"127.0.0.1", "localhost", "::1"}


def _project_texts() -> dict[str, str]:
    """README, docs, MLproject, conf, src, tests and bench: everywhere a server could be started or shown."""
    files = [REPO / "README.md", REPO / "MLproject"]
    for folder, pattern in (("docs", "*.md"), ("conf", "*.yaml"), ("src", "*.py"), ("tests", "*.py"),
                            ("bench", "*")):
        files += sorted((REPO / folder).rglob(pattern))
    this = Path(__file__).resolve()
    return {str(f.relative_to(REPO)): f.read_text() for f in files if f.is_file() and f.resolve() != this
            and f.suffix not in (".pyc", ".png", ".h5")}


@pytest.mark.slow
def test_every_server_binds_localhost():
    from mlflow.cli import cli

    mlflow_default = next(p.default for p in cli.get_command(None, "server").params if p.name == "host")
    assert mlflow_default in LOCAL  # `mlflow server` / `mlflow ui` without --host stay local
    texts = _project_texts()
    assert "README.md" in texts and any(k.startswith("tests/") for k in texts)
    found = []
    for name, text in texts.items():
        assert "0.0.0.0" not in text, f"{name} binds all interfaces"
        for match in SERVER_COMMAND.finditer(text):
            # the command's own line(s): up to the end of the Python list / markdown code span / line
            window = text[match.start() : match.start() + 400]
            end = min(i for i in (window.find("`", 1), window.find("]"), window.find("\n\n"), len(window)) if i > 0)
            hosts = HOST.findall(window[:end])
            found.append((name, hosts))
            if match.group(0).lower().startswith("optuna-dashboard"):
                assert hosts, f"{name}: optuna-dashboard without --host 127.0.0.1"
            assert all(h in LOCAL for h in hosts), f"{name}: {window[:end]!r} binds {hosts}"
    # README, docs/mlflow.md and the PostgreSQL-backed server fixture (tests/conftest.py) all start or show servers
    assert {"README.md", "docs/mlflow.md", "tests/conftest.py"} <= {n for n, _ in found}, found


HOSTILE = "x \"a b\" 'c d' ; touch {m}1 | touch {m}2 $(touch {m}3) `touch {m}4` && touch {m}5 > {m}6"


@pytest.mark.parametrize(
    "entry,param",
    [("main", "overrides"), ("train", "samples_dir")],
)
@pytest.mark.slow
def test_mlproject_parameters_are_data_not_shell(tmp_path, cache_dir, entry, param):
    """A parameter holding spaces, quotes, ;, |, $(...), backticks, && and > executes nothing: MLflow quotes it
    into `sh -c '...' VALUE`, where it is only split into words (globbing off) and handed to Hydra."""
    marker = tmp_path / "PWNED"
    value = HOSTILE.format(m=marker)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache_dir), MLFLOW_TRACKING_URI=uri)
    params = ["-P", f"{param}={value}"]
    if entry == "train":
        params += ["-P", f"overrides={' '.join(TINY)} hydra.run.dir={tmp_path}/run"]
    before = set(REPO.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, *params, "--env-manager", "local",
         "--experiment-name", "madminer-sweeper"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    created = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("PWNED"))
    assert not created, f"the shell ran part of the parameter: {created}\n{out[-3000:]}"
    assert set(REPO.iterdir()) == before  # `mlflow run` runs in the project dir: nothing appeared there either
    # the words reached Hydra as overrides (and were refused), the run is recorded as FAILED
    assert proc.returncode != 0 and ("override" in out.lower() or "LexerNoViableAltException" in out), out[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("madminer-sweeper").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.params[param] == shlex.quote(value)  # MLflow quoted it for the shell: one word


@pytest.mark.slow
def test_a_model_file_holding_code_executes_nothing(run_app, tmp_path):
    """torch.load of a model file is weights_only=True (app.ml.estimators): a pickled call is refused in one line."""
    import torch

    run_app(*TINY, "evaluation.fisher.enabled=false", "evaluation.truth=false")
    model_dir = tmp_path / "run" / "model"
    marker = tmp_path / "PWNED_TORCH"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = model_dir / "estimator_state_dict.pt"
    assert state.exists()
    torch.save({"weights": Payload()}, state)
    # the model folder's manifest no longer matches: refused before anything is loaded
    proc = run_app(*TINY, "stage=evaluate", f"training.model_dir={model_dir}", check=False,
                   run_dir=tmp_path / "evaluate")
    assert not marker.exists() and proc.returncode == 2
    assert "cannot be trusted: file changed: estimator_state_dict.pt" in proc.stderr, proc.stderr[-2000:]
    # and one who rewrote the manifest too still gets nothing executed: torch.load(weights_only=True)
    from app.store import cache

    cache.write_manifest(model_dir, cache.read_provenance(model_dir))
    proc = run_app(*TINY, "stage=evaluate", f"training.model_dir={model_dir}", check=False,
                   run_dir=tmp_path / "evaluate2")
    assert not marker.exists()
    assert proc.returncode == 2 and "Traceback" not in proc.out, proc.out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "refused to load a model file" in errors[0] and "system" in errors[0], proc.stderr
