"""Secrets never reach MLflow, a log line or the console: values under secret-looking keys and ``user:password@`` in
URIs become ``***`` (params, tags, artifacts, log records). No MLflow import."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
# Keys that hold secrets: password, secret, token, credential, api_key / apikey, and key itself or NAME_key.
SECRET_WORDS = r"password|passwd|secret|token|credential|api_?key"
SECRET_KEY = re.compile(rf"{SECRET_WORDS}|(?:^|[_.\-])key$", re.IGNORECASE)
SECRET_PAIR = re.compile(  # key=value / key: value pairs inside free text (overrides, YAML dumps, log lines)
    rf"(?<![\w.\-])(?P<key>[\w.\-]*(?:{SECRET_WORDS})[\w.\-]*|(?:[\w.\-]*[_.\-])?key)"
    r"(?P<sep>\s*[=:]\s*)(?:'[^']*'|\"[^\"]*\"|[^\s,'\"\]}]+)",  # a quoted value whole
    re.IGNORECASE,
)
URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ (or token@) in any URI


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
    return SECRET_PAIR.sub(lambda m: f"{m.group('key')}{m.group('sep')}{REDACTED}", text)


def redact_log_records() -> None:
    """Every log record's message passes :func:`redact_text` when it is created, whatever handlers Hydra
    configures later (its own sweep lines ``#0 : <overrides>``, the Optuna sweeper's ``Storage: <url>``,
    the jobs' console and ``<job>.log``). Installed once per process by :mod:`app.main` (and the MLflow helper)."""
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
