"""``--help`` lists the config groups from one copy of Hydra's config repository, with Hydra's own text."""

from __future__ import annotations

import subprocess
import sys

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
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
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
