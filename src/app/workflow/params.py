"""Parameters as data: percent-encoding for yadage's shell, Hydra quoting, paths a shell leaves alone, and the
overrides the workflow accepts."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote, unquote

from app.errors import UserError

SAFE_PATH = re.compile(r"^[A-Za-z0-9/._,=+:@-]+$")
NONE = "none"  # the tracking URI of a workflow without MLflow
# Overrides that the workflow itself sets for every step; a user override of them is an error.
RESERVED = ("stage", "training", "hydra.run.dir", "hydra.sweep.dir", "sampling.samples_dir",
            "evaluation.results_dir", "paths.cache_dir")
# ${oc.env:NAME} (optionally with a default), or ${oc.decode:${oc.env:NAME}}: read from the environment
ENV_REF = re.compile(
    r"^\$\{(?:oc\.env:(?P<a>[A-Za-z_]\w*)(?:,[^${}]*)?|oc\.decode:\$\{oc\.env:(?P<b>[A-Za-z_]\w*)\})\}$"
)


def encode(value: str) -> str:
    """Percent-encode everything a shell (or yadage's ``str.format``) could act on; '' becomes '%'."""
    if value == "":
        return "%"
    return quote(value, safe="/,=+:@").replace("~", "%7E")


def decode(value: str) -> str:
    return "" if value == "%" else unquote(value)


def hydra_value(value: str) -> str:
    """``value`` as a single-quoted Hydra override value that Hydra and OmegaConf read back unchanged."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)  # backslashes before a quote / at the end
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"


def safe_path(path: Path, what: str) -> Path:
    """Yadage puts paths into shell commands unquoted: allow only characters a shell leaves alone."""
    path = path.resolve()
    if not SAFE_PATH.match(str(path)):
        raise UserError(
            f"{what} {path} has characters that yadage would pass to a shell unquoted; choose a directory "
            "whose path holds only letters, digits and /._,=+:@-"
        )
    return path


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        if o.startswith("-"):
            raise UserError(f"{o}: only Hydra overrides (key=value) go to the workflow's steps, no options")
        if override_key(o) in RESERVED:
            raise UserError(
                f"override {o} is set by the workflow itself for every step; choose methods with --methods "
                "(METHODS=...) and leave stage, training, hydra.run.dir and the stage inputs to the workflow"
            )


def data_args(data: str) -> list[str]:
    """The overrides that select the event file (none for the toy)."""
    return [] if data == "toy" else ["data=file", f"data.path={hydra_value(data)}"]


def env_name(value: str) -> str | None:
    """The environment variable a value refers to (``${oc.env:NAME}``), or None."""
    m = ENV_REF.match(value)
    return (m.group("a") or m.group("b")) if m else None


def expand(value: str) -> str:
    """A value, or the environment variable's value when it is a reference (the runner's tracking URI)."""
    name = env_name(value)
    if name is None:
        return value
    if name not in os.environ:
        raise UserError(f"{value} refers to the environment variable {name}, which is not set; export it first")
    return os.environ[name]
