"""Secrets never enter yadage's inputs, state or step logs: they travel to the steps in environment variables."""

from __future__ import annotations

import os

from app.tracking.redaction import SECRET_KEY, URI_CREDENTIALS, redact_text
from app.workflow.params import NONE, env_name, override_key

SECRET_ENV = "MADMINER_SWEEPER_SECRET_"


def protect_secrets(overrides: list[str], uri: str) -> tuple[list[str], str, list[str]]:
    """Move secret override values and a tracking URI with credentials into environment variables.

    Returns the overrides and URI with ``${oc.env:NAME}`` in place of each secret, and the names of every
    environment variable the steps need (to pass into containers). Sets them in ``os.environ``, which
    yadage's local steps inherit.
    """
    names: list[str] = []
    safe: list[str] = []
    for o in overrides:
        key, sep, value = o.partition("=")
        bare = override_key(o)
        if not sep or o.startswith("~"):
            safe.append(o)
            continue
        if env_name(value):
            names.append(env_name(value))
            safe.append(o)
            continue
        if not (SECRET_KEY.search(bare) or URI_CREDENTIALS.search(value) or redact_text(value) != value):
            safe.append(o)
            continue
        name = f"{SECRET_ENV}{len(names) + 1}"
        if value[:1] in "{[":  # a dict or list: decoded back to one
            os.environ[name], ref = value, f"${{oc.decode:${{oc.env:{name}}}}}"
        else:
            quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "'\""
            os.environ[name], ref = (value[1:-1] if quoted else value), f"${{oc.env:{name}}}"
        names.append(name)
        safe.append(f"{key}='{ref}'")
    if uri != NONE and env_name(uri) is None and URI_CREDENTIALS.search(uri):
        name = f"{SECRET_ENV}TRACKING_URI"
        os.environ[name], uri = uri, f"${{oc.env:{name}}}"
        names.append(name)
    elif env_name(uri):
        names.append(env_name(uri))
    return safe, uri, list(dict.fromkeys(names))
