"""``--help`` lists the config groups from one copy of Hydra's config repository, with Hydra's own text."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

COUNT_COPIES = (
    "import sys\n"
    "from hydra._internal import config_repository as r\n"
    "init = r.CachingConfigRepository.__init__\n"
    "n = [0]\n"
    "def counting(self, delegate):\n"
    "    n[0] += 1\n"
    "    init(self, delegate)\n"
    "r.CachingConfigRepository.__init__ = counting\n"
    "import app.main as m\n"
    "sys.argv = ['app', '--help']\n"
    "try:\n    m.main() if '{patched}' == 'yes' else m.task()\n"
    "except SystemExit:\n    pass\n"
    "print('COPIES', n[0], file=sys.stderr)\n"
)


def _help(patched: bool) -> tuple[str, int]:
    code = COUNT_COPIES.replace("{patched}", "yes" if patched else "no")
    env = dict(os.environ, MADMINER_SWEEPER_FULL_EXIT="1")  # main() returns here, as Python's own exit does
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    copies = int(proc.stderr.rsplit("COPIES", 1)[1].split()[0])
    return proc.stdout, copies


def test_help_shares_one_repository_copy_and_keeps_hydras_text():
    fast_text, fast_copies = _help(patched=True)
    slow_text, slow_copies = _help(patched=False)
    # the same text, less the `schema` group (the typed bases of the presets, not a choice)
    assert "\nschema: " in slow_text and "\nschema: " not in fast_text
    schema_line = next(line for line in slow_text.splitlines() if line.startswith("schema: "))
    assert fast_text == slow_text.replace(schema_line + "\n", "")
    assert "training: alice, alices, carl" in fast_text and "== Config ==" in fast_text
    assert slow_copies > 50  # Hydra 1.3: one deep copy per listed group (and more)
    assert fast_copies <= 3, fast_copies


EXIT = (
    "import atexit, sys, threading, time\n"
    "from pathlib import Path\n"
    "from app.main import exit_now\n"
    "out = Path(sys.argv[1])\n"
    "def later():\n    time.sleep(0.5)\n    (out / 'thread').write_text('joined')\n"
    "threading.Thread(target=later).start()\n"
    "atexit.register(lambda: (out / 'atexit').write_text('ran'))\n"
    "sys.stdout.write('buffered, no newline')\n"
    "log = open(out / 'log', 'w', buffering=1 << 20)\n"
    "log.write('kept')\n"
    "atexit.register(log.close)\n"
    "exit_now(sys.argv[2] if not sys.argv[2].isdigit() else int(sys.argv[2]))\n"
    "print('never here')\n"
)


@pytest.mark.parametrize("code, rc", [("0", 0), ("3", 3), ("stopped: a message", 1)])
def test_exit_now_keeps_what_a_normal_exit_guarantees(tmp_path, code, rc):
    """exit_now skips the module teardown only: threads joined, atexit handlers run, buffers flushed, exit code."""
    env = {k: v for k, v in os.environ.items() if k != "MADMINER_SWEEPER_FULL_EXIT"}
    proc = subprocess.run([sys.executable, "-c", EXIT, str(tmp_path), code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == rc, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "thread").read_text() == "joined" and (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "log").read_text() == "kept"
    assert ("stopped: a message" in proc.stderr) == (rc == 1)
    assert "Traceback" not in proc.stderr
