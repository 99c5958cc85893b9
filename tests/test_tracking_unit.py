"""The pure pieces of the MLflow layer: redaction, flattening, truncation."""

from __future__ import annotations

from app import tracking


def test_redact_keys_and_uri_credentials():
    tree = {
        "db_password": "hunter2",
        "nested": {"API_KEY": "abc", "apikey": "def", "credentials": {"user": "x"}, "ok": 1},
        "uri": "postgresql://alice:hunter2@db:5432/mlflow",
        "plain": "http://db:5000",
        "list": ["https://bob:pw@host/x", "fine"],
        "session_token": None,
    }
    out = tracking.redact(tree)
    assert out["db_password"] == "***" and out["session_token"] == "***"
    assert out["nested"] == {"API_KEY": "***", "apikey": "***", "credentials": "***", "ok": 1}
    assert out["uri"] == "postgresql://***@db:5432/mlflow"
    assert out["plain"] == "http://db:5000"
    assert out["list"] == ["https://***@host/x", "fine"]


def test_redact_text_key_value_pairs():
    text = "+vars.db_password=hunter2 training=alices secret: s3cr3t api_key=abc,token=t0k"
    out = tracking.redact_text(text)
    assert "hunter2" not in out and "s3cr3t" not in out and "abc" not in out and "t0k" not in out
    assert "training=alices" in out and "+vars.db_password=***" in out


def test_flatten_dotted_keys_and_compact_json():
    flat = tracking.flatten(
        {"training": {"alpha": 1.0, "n_hidden": [100, 100], "clip": None, "early": True},
         "sampling": {"theta0": {"priors": [["gaussian", 0.0, 1.0]]}}, "vars": {}, "stage": "all"}
    )
    assert flat == {
        "training.alpha": "1.0",
        "training.n_hidden": "[100,100]",
        "training.clip": "null",
        "training.early": "true",
        "sampling.theta0.priors": '[["gaussian",0.0,1.0]]',
        "vars": "{}",
        "stage": "all",
    }


def test_truncate_marks_long_values():
    value = "x" * 7000
    out = tracking.truncate(value, 6000)
    assert len(out) == 6000 and out.endswith(tracking.TRUNCATED)
    assert tracking.truncate("short", 6000) == "short"
