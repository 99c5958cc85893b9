"""The thin MLflow layer: connect, redact, flatten, and log in batches.

Only :mod:`app.callbacks` uses it; stages never import MLflow. MLflow itself is imported lazily.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from app.errors import UserError

REDACTED = "***"
# Keys that hold secrets: password, secret, token, credential, api_key / apikey, and key itself or NAME_key.
SECRET_WORDS = r"password|passwd|secret|token|credential|api_?key"
SECRET_KEY = re.compile(rf"{SECRET_WORDS}|(?:^|[_.\-])key$", re.IGNORECASE)
_SECRET_PAIR = re.compile(  # key=value / key: value pairs inside free text (overrides, YAML dumps, log lines)
    rf"(?<![\w.\-])(?P<key>[\w.\-]*(?:{SECRET_WORDS})[\w.\-]*|(?:[\w.\-]*[_.\-])?key)"
    r"(?P<sep>\s*[=:]\s*)[^\s,'\"\]]+",
    re.IGNORECASE,
)
URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ (or token@) in any URI
TRUNCATED = "...[truncated; full value in the config artifact]"
BATCH = 100  # MLflow's per-request limit for params and tags

# An unreachable server takes minutes with MLflow's default retries; fail within seconds instead.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class TrackingUnavailable(UserError):
    """The tracking store cannot be reached."""


def redact(value: Any, key: str = "") -> Any:
    """Replace secrets: values under keys that look secret, and credentials inside URIs."""
    if key and SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    text = URI_CREDENTIALS.sub(f"{REDACTED}@", text)
    return _SECRET_PAIR.sub(lambda m: f"{m.group('key')}{m.group('sep')}{REDACTED}", text)


def redact_log_records() -> None:
    """Every log record's message passes :func:`redact_text` when it is created, whatever handlers Hydra
    configures later (its own sweep lines ``#0 : <overrides>``, the Optuna sweeper's ``Storage: <url>``,
    the jobs' console and ``<job>.log``). Installed once per process by :mod:`app.main`."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's to report, when it emits
            return record
        safe = redact_text(message)
        if safe != message:
            record.msg, record.args = safe, None
        return record

    factory.redacts = True
    logging.setLogRecordFactory(factory)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Dotted keys for nested dicts; lists (and empty dicts) as compact JSON; values as strings."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return flat


def truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(TRUNCATED)] + TRUNCATED


def configure(uri: str) -> None:
    for name, default in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, default)
    import mlflow

    mlflow.set_tracking_uri(uri)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment id, created if needed; fails fast with one line if the store is unreachable."""
    configure(uri)
    c = client(uri)
    try:
        experiment = c.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            # Without this tag MLflow 3's UI opens the experiment in its GenAI view.
            return c.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
        except Exception:  # created concurrently by another process
            experiment = c.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id
    except Exception as err:  # noqa: BLE001 - any failure to reach the store is reported the same way
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingUnavailable(
            f"MLflow tracking store {redact_text(uri)} is unreachable ({redact_text(first)[:200]}); start the server, "
            "fix tracking.uri / MLFLOW_TRACKING_URI, or run with tracking=local or tracking=disabled"
        ) from None


def log_params(c, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    items = [Param(k, truncate(str(v), MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
    for batch in _chunks(items, BATCH):
        c.log_batch(run_id, params=batch)


def set_tags(c, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    items = [RunTag(k, truncate(redact_text(str(v)), MAX_TAG_VAL_LENGTH)) for k, v in tags.items() if v is not None]
    for batch in _chunks(items, BATCH):
        c.log_batch(run_id, tags=batch)


def log_metrics(c, run_id: str, metrics: Iterable[tuple[str, float, int]]) -> None:
    """(key, value, step) triples in batches."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v, step in metrics]
    for batch in _chunks(items, 1000):
        c.log_batch(run_id, metrics=batch)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
