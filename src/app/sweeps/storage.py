"""What an Optuna storage needs before Optuna opens it."""

from __future__ import annotations

from typing import Any

from app.store.files import sqlite_path


def prepare_storage(storage: Any) -> None:
    """sqlite needs the folder of its database file (``multirun/`` for the presets) to exist."""
    path = sqlite_path(storage)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
