"""The stage cache (app.store.cache): keys, verified hits, damaged entries, killed builds, concurrent builds,
memoised data digests and the ``python -m app.store`` command. Real processes where kills or races matter."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.store import cache
from app.store.cache import MANIFEST, StageCache, file_digest, read_provenance, stage_key, verify, write_manifest

SRC = Path(cache.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
KEY = "ab" * 32

# A build used from child processes: writes a file in a sub-folder, records that it ran, optionally
# announces itself and sleeps (so the parent can kill it or race it).
WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from app.store.cache import StageCache

    root, key, log_file, started, sleep, go = sys.argv[1:7]

    def build(tmp):
        (tmp / "ensemble" / "estimator_0").mkdir(parents=True)
        (tmp / "ensemble" / "estimator_0" / "weights.bin").write_bytes(b"w" * 1000)
        with open(log_file, "a") as f:
            f.write(f"{os.getpid()}\\n")
        Path(started).touch()
        time.sleep(float(sleep))
        (tmp / "x.npy").write_bytes(b"x" * 100)

    while go != "-" and not Path(go).exists():
        time.sleep(0.01)
    entry, reused = StageCache(root).get_or_create("train", key, build, {"method": "alices"})
    print(json.dumps({"reused": reused, "path": str(entry.path)}))
    """
)


def _builder(calls: list, content: bytes = b"payload"):
    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "ensemble" / "estimator_0").mkdir(parents=True)
        (tmp / "ensemble" / "estimator_0" / "settings.json").write_text('{"n_hidden": [16, 16]}')
        (tmp / "x_train.npy").write_bytes(content)

    return build


def _worker(tmp_path: Path, root: Path, *, sleep: float, go: str = "-", name: str = "w") -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [str(root), KEY, str(tmp_path / "builds.log"), str(tmp_path / f"{name}.started"), str(sleep), go]
    return subprocess.Popen(
        [sys.executable, str(script), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"worker ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


# --------------------------------------------------------------------------- keys
def test_key_changes_with_each_input_and_not_otherwise(monkeypatch):
    base = dict(
        data_digest="d" * 64,
        config={"training": {"alpha": 1.0, "n_hidden": [16, 16]}, "seed": 1},
        upstream="u" * 64,
    )
    key = stage_key("train", **base)
    assert len(key) == 64 and int(key, 16) >= 0
    # Not otherwise: same inputs, other mapping order, a tuple for a list.
    same = {"seed": 1, "training": {"n_hidden": (16, 16), "alpha": 1.0}}
    assert stage_key("train", data_digest="d" * 64, config=same, upstream="u" * 64) == key
    variants = [
        stage_key("evaluate", **base),
        stage_key("train", **{**base, "data_digest": "e" * 64}),
        stage_key("train", **{**base, "config": {**base["config"], "seed": 2}}),
        stage_key("train", **{**base, "config": {"training": {"alpha": 2.0, "n_hidden": [16, 16]}, "seed": 1}}),
        stage_key("train", **{**base, "config": {"training": {"alpha": 1.0, "n_hidden": [16, 8]}, "seed": 1}}),
        stage_key("train", **{**base, "config": {**base["config"], "extra": None}}),
        stage_key("train", **{**base, "upstream": None}),
        stage_key("train", **{**base, "upstream": "v" * 64}),
    ]
    monkeypatch.setattr(cache, "versions", lambda: {"madminer-sweeper": "9.9.9", "madminer": "0.9.6"})
    variants.append(stage_key("train", **base))
    assert key not in variants
    assert len(set(variants)) == len(variants)


def test_versions_come_from_package_metadata_without_importing_madminer():
    packages = ("madminer-sweeper", "madminer", "torch", "numpy", "scipy")
    code = (
        "import sys, app.store.cache as c; v = c.versions()\n"
        f"print(*[v[p] for p in {packages}], [m for m in ('madminer', 'torch', 'numpy', 'scipy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    from importlib.metadata import version

    assert out.stdout.split() == [*(version(p) for p in packages), "[]"]


def test_key_holds_the_numerical_packages_and_the_resolved_device(monkeypatch):
    """A model made with another torch, NumPy or SciPy, or on the other device, is another entry; ``auto`` is keyed
    as the device it resolves to (a cache shared by a CPU and a GPU node serves each its own); sampling.n_processes
    changes no output, so it is not keyed."""
    from omegaconf import OmegaConf

    from app.store import provenance

    def configs(device: str, resolved: str, n_processes: int = 1) -> dict:
        cfg = OmegaConf.create(
            {
                "sampling": {"seed": 1, "n_processes": n_processes},
                "training": {"estimator": "single", "device": device},
                "evaluation": {"luminosity": 1.0},
                "seed": 1,
            }
        )
        return provenance.stage_configs(cfg, resolved)

    def key(stage: str, config: dict) -> str:
        return stage_key(stage, data_digest="d" * 64, config=config[stage], upstream=None)

    on_cpu, auto_on_cpu, auto_on_gpu = configs("cpu", "cpu"), configs("auto", "cpu"), configs("auto", "cuda")
    for stage in ("train", "evaluate"):
        assert key(stage, auto_on_cpu) == key(stage, on_cpu)
        assert key(stage, auto_on_gpu) != key(stage, on_cpu)
    assert key("sample", auto_on_gpu) == key("sample", on_cpu)  # sampling runs no model
    # the same samples on any number of processes (madminer_patches.seeded_sets): one entry
    assert all(key(s, configs("cpu", "cpu", n_processes=4)) == key(s, on_cpu) for s in ("sample", "evaluate"))
    base = dict(cache.versions())
    keys = set()
    for package in ("torch", "numpy", "scipy", None):
        found = base if package is None else {**base, package: "0.0.1"}
        monkeypatch.setattr(cache, "versions", lambda found=found: found)
        keys.add(key("train", on_cpu))
    assert len(keys) == 4


def test_import_is_cheap():
    heavy = ("numpy", "torch", "madminer", "omegaconf")
    code = f"import sys, app.store.cache; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_auto_device_resolves_without_importing_a_cpu_only_torch():
    """A job whose stages all come from the cache resolves training.device=auto for its keys without paying for
    torch's import, where the installed torch is a CPU-only build."""
    from importlib.metadata import version

    if not version("torch").endswith("+cpu"):
        pytest.skip(f"torch {version('torch')} is not a CPU-only build: auto asks torch")
    code = "import sys; from app.ml.device import resolve; print(resolve('auto'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cpu", "False"]


def test_a_given_folder_recorded_with_a_setting_that_changes_no_output_is_accepted(tmp_path):
    """Samples recorded with sampling.n_processes (as before it left the keys) fit a run with any n_processes; a
    setting that does change them is still refused."""
    from omegaconf import OmegaConf

    from app.domain.methods import get_method
    from app.errors import UserError
    from app.store import provenance

    cfg = OmegaConf.create(
        {"sampling": {"seed": 1, "n_processes": 1}, "training": {"estimator": "single"}, "evaluation": {}, "seed": 1}
    )
    expected = provenance.stage_configs(cfg, "cpu")
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "x_train.npy").write_bytes(b"x")
    recorded = {"sampling": {"seed": 1, "n_processes": 4}}
    write_manifest(folder, {"data_digest": "d" * 64, "configs": {"sample": recorded}})
    method = get_method("alices")
    assert provenance.check_given("sample", folder, expected, "d" * 64, method)["configs"]["sample"] == recorded
    write_manifest(folder, {"data_digest": "d" * 64, "configs": {"sample": {"sampling": {"seed": 2}}}})
    with pytest.raises(UserError, match="was made with sampling.seed=2 but this run has sampling.seed=1"):
        provenance.check_given("sample", folder, expected, "d" * 64, method)


def test_key_refuses_values_that_are_not_plain():
    with pytest.raises(TypeError, match="object"):
        stage_key("train", data_digest="d", config={"x": object()}, upstream=None)


# --------------------------------------------------------------------------- hits and misses
def test_miss_builds_once_then_hits_with_provenance(tmp_path):
    store, calls = StageCache(tmp_path / "c"), []
    entry, reused = store.get_or_create("train", KEY, _builder(calls), {"method": "alices", "run_id": "r1"})
    assert (reused, len(calls)) == (False, 1)
    assert entry.path == tmp_path / "c" / "stages" / "train" / KEY
    assert (entry.path / "ensemble" / "estimator_0" / "settings.json").is_file()
    assert verify(entry.path) is None
    assert entry.meta["method"] == "alices" and entry.meta["run_id"] == "r1"
    assert (entry.meta["stage"], entry.meta["key"]) == ("train", KEY)
    assert entry.meta["versions"] == cache.versions() and entry.meta["created"].endswith("Z")
    assert read_provenance(entry.path) == entry.meta
    manifest = json.loads((entry.path / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["ensemble/estimator_0/settings.json", "x_train.npy"]
    assert manifest["files"]["x_train.npy"] == {"size": 7, "sha256": hashlib.sha256(b"payload").hexdigest()}

    again, reused = store.get_or_create("train", KEY, _builder(calls), {"method": "other"})
    assert (reused, len(calls)) == (True, 1)
    assert again == entry
    _, reused = store.get_or_create("train", "cd" * 32, _builder(calls), {})  # another key: a miss
    assert (reused, len(calls)) == (False, 2)
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_a_failing_build_leaves_nothing_and_the_next_call_builds(tmp_path):
    store, calls = StageCache(tmp_path / "c"), []

    def broken(tmp: Path) -> None:
        (tmp / "half.npy").write_bytes(b"half")
        raise RuntimeError("NaN loss")

    with pytest.raises(RuntimeError, match="NaN loss"):
        store.get_or_create("train", KEY, broken, {})
    assert not store.entry_path("train", KEY).exists()
    assert list((tmp_path / "c" / "tmp").iterdir()) == []
    _, reused = store.get_or_create("train", KEY, _builder(calls), {})
    assert (reused, len(calls)) == (False, 1)


def test_disabled_cache_never_serves_and_refuses_to_build(tmp_path):
    StageCache(tmp_path / "c").get_or_create("train", KEY, _builder([]), {})
    off = StageCache(tmp_path / "c", enabled=False)
    with pytest.raises(RuntimeError, match="off"):
        off.get_or_create("train", KEY, _builder([]), {})


@pytest.mark.parametrize("name", ["../up", "a/b", "", "x.y"])
def test_stage_and_key_names_cannot_escape_the_root(tmp_path, name):
    with pytest.raises(ValueError, match="letters, digits"):
        StageCache(tmp_path).get_or_create("train", name, _builder([]), {})
    with pytest.raises(ValueError, match="letters, digits"):
        StageCache(tmp_path).get_or_create(name, KEY, _builder([]), {})
    assert not (tmp_path / "stages").exists()


# --------------------------------------------------------------------------- damaged entries
def _change_same_size(path: Path) -> None:
    (path / "x_train.npy").write_bytes(b"PAYLOAD")


def _remove_file(path: Path) -> None:
    (path / "ensemble" / "estimator_0" / "settings.json").unlink()


def _remove_manifest(path: Path) -> None:
    (path / MANIFEST).unlink()


def _add_file(path: Path) -> None:
    (path / "ensemble" / "stray.npy").write_bytes(b"")


def _garble_manifest(path: Path) -> None:
    (path / MANIFEST).write_text("{not json")


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_change_same_size, "file changed: x_train.npy (sha256"),
        (_remove_file, "file missing: ensemble/estimator_0/settings.json"),
        (_remove_manifest, f"no {MANIFEST}"),
        (_add_file, "unexpected file: ensemble/stray.npy"),
        (_garble_manifest, f"unreadable {MANIFEST}"),
    ],
)
def test_a_damaged_entry_is_not_served_and_is_rebuilt(tmp_path, caplog, damage, problem):
    store, calls = StageCache(tmp_path / "c"), []
    entry, _ = store.get_or_create("train", KEY, _builder(calls), {"method": "alices"})
    damage(entry.path)
    assert verify(entry.path).startswith(problem)
    with caplog.at_level(logging.WARNING, logger="app.store.cache"):
        rebuilt, reused = store.get_or_create("train", KEY, _builder(calls), {})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and problem in warnings[0] and KEY[:12] in warnings[0]
    assert (reused, len(calls)) == (False, 2)  # not served: built again
    assert verify(rebuilt.path) is None
    assert (rebuilt.path / "x_train.npy").read_bytes() == b"payload"
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_manifest_of_a_plain_output_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "ensemble" / "estimator_1").mkdir(parents=True)
    (folder / "ensemble" / "estimator_1" / "state.pt").write_bytes(b"\x00" * 10)
    (folder / "model.json").write_text("{}")
    assert verify(folder) == f"no {MANIFEST} in {folder}"
    assert read_provenance(folder) is None
    write_manifest(folder, {"data_sha256": "d" * 64, "test_split": 0.2, "created": "fixed"})
    assert verify(folder) is None
    prov = read_provenance(folder)
    assert prov["data_sha256"] == "d" * 64 and prov["test_split"] == 0.2 and prov["created"] == "fixed"
    assert prov["versions"] == cache.versions()
    (folder / "ensemble" / "estimator_1" / "state.pt").write_bytes(b"\x00" * 11)
    assert verify(folder) == "file changed: ensemble/estimator_1/state.pt (11 bytes, manifest says 10)"
    assert verify(tmp_path / "absent").endswith("is not a folder")


# --------------------------------------------------------------------------- processes
def test_kill_9_during_a_build_leaves_nothing_served_and_the_next_call_builds(tmp_path):
    root = tmp_path / "c"
    store = StageCache(root)
    proc = _worker(tmp_path, root, sleep=60)
    try:
        _wait_for(tmp_path / "w.started", proc)
        temps = list((root / "tmp").iterdir())
        assert len(temps) == 1 and (temps[0] / "ensemble" / "estimator_0" / "weights.bin").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert temps[0].exists()  # the leftover ...
    assert not (root / "stages" / "train" / KEY).exists()  # ... is never in place

    calls = []
    entry, reused = store.get_or_create("train", KEY, _builder(calls), {})
    assert (reused, len(calls)) == (False, 1)
    assert verify(entry.path) is None and (entry.path / "x_train.npy").read_bytes() == b"payload"
    assert list((root / "tmp").iterdir()) == []  # the leftover of the killed build is gone


def test_two_processes_with_the_same_key_build_once_and_both_succeed(tmp_path):
    root, go = tmp_path / "c", tmp_path / "go"
    procs = [_worker(tmp_path, root, sleep=1.0, go=str(go), name=f"w{i}") for i in range(2)]
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # the build ran exactly once
    assert sorted(r["reused"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"] == str(root / "stages" / "train" / KEY)
    assert [p.name for p in (root / "stages" / "train").iterdir()] == [KEY]
    assert verify(results[0]["path"]) is None
    assert list((root / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- data file digests
def test_digest_is_memoised_and_recomputed_when_size_or_mtime_change(tmp_path, monkeypatch):
    data, root = tmp_path / "events.h5", tmp_path / "c"
    data.write_bytes(b"a" * 5000)
    reads = []
    real = cache._sha256_file
    monkeypatch.setattr(cache, "_sha256_file", lambda p: reads.append(p) or real(p))

    digest = file_digest(data, root)
    assert digest == hashlib.sha256(b"a" * 5000).hexdigest()
    assert file_digest(tmp_path / "." / "events.h5", root) == digest  # same resolved path: no second read
    assert len(reads) == 1
    memo = json.loads((root / "digests.json").read_text())
    assert memo[str(data.resolve())]["sha256"] == digest

    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again, same digest
    assert file_digest(data, root) == digest and len(reads) == 2
    data.write_bytes(b"b" * 5000)  # same size, new content
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    assert file_digest(data, root) == hashlib.sha256(b"b" * 5000).hexdigest() and len(reads) == 3
    data.write_bytes(b"b" * 5001)  # other size, same mtime
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    assert file_digest(data, root) == hashlib.sha256(b"b" * 5001).hexdigest() and len(reads) == 4
    assert file_digest(data, root) and len(reads) == 4


def test_concurrent_jobs_hash_each_file_once_and_every_digest_lands_in_the_memo(tmp_path):
    """Eight processes, two per file, at once: four reads in all, and no memo update is lost."""
    root, go, reads = tmp_path / "c", tmp_path / "go", tmp_path / "reads.log"
    files = []
    for i in range(4):
        files.append(tmp_path / f"f{i}.h5")
        files[-1].write_bytes(bytes([i]) * 8_000_000)
    code = (
        "import sys, time; from pathlib import Path; from app.store import cache\n"
        "real = cache._sha256_file\n"
        "def spy(p):\n"
        "    with open(sys.argv[4], 'a') as f: f.write(str(p) + '\\n')\n"
        "    return real(p)\n"
        "cache._sha256_file = spy\n"
        "while not Path(sys.argv[3]).exists(): time.sleep(0.001)\n"
        "print(cache.file_digest(sys.argv[1], sys.argv[2]))"
    )
    cmd = [sys.executable, "-c", code]
    procs = [
        subprocess.Popen([*cmd, str(f), str(root), str(go), str(reads)], env=ENV, stdout=subprocess.PIPE)
        for f in files * 2
    ]
    go.touch()
    outs = [p.communicate(timeout=60)[0].decode().strip() for p in procs]
    expected = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert outs == expected * 2
    assert sorted(reads.read_text().split()) == sorted(str(f.resolve()) for f in files)
    memo = json.loads((root / "digests.json").read_text())
    assert {k: v["sha256"] for k, v in memo.items()} == {str(f.resolve()): d for f, d in zip(files, expected)}


# --------------------------------------------------------------------------- size, clear, command line
def _populate(root: Path) -> None:
    store = StageCache(root)
    store.get_or_create("sample", KEY, _builder([], b"s" * 300), {})
    store.get_or_create("sample", "cd" * 32, _builder([], b"t" * 300), {})
    store.get_or_create("train", KEY, _builder([], b"m" * 2000), {})
    (root / "toy").mkdir()
    (root / "toy" / "toy-0123456789ab.h5").write_bytes(b"h" * 4000)
    file_digest(root / "toy" / "toy-0123456789ab.h5", root)


def _bytes_under(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_size_and_clear(tmp_path):
    root = tmp_path / "c"
    _populate(root)
    (root / "notes.txt").write_text("mine, not the cache's")
    store = StageCache(root)
    assert store.entries() == {"sample": 2, "train": 1}
    total = store.size()
    assert total == _bytes_under(root) and total > 2000 + 600 + 4000
    freed = store.clear()
    assert freed == total - len("mine, not the cache's")
    assert [p.name for p in root.iterdir()] == ["notes.txt"]  # only what the project writes is removed
    assert store.size() == len("mine, not the cache's")
    assert store.entries() == {} and not store.entry_path("train", KEY).exists()
    (root / "notes.txt").unlink()
    assert store.clear() == 0 and not root.exists()


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.store", *args], env=env or ENV, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_command_line_info_and_clear(tmp_path):
    root = tmp_path / "c"
    _populate(root)
    total = StageCache(root).size()
    info = _cli("info", "--dir", str(root))
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    assert lines[0] == f"cache: {root.resolve()}"
    assert any(line.split(":")[0].strip() == "sample" and "2 entries" in line for line in lines)
    assert any(line.split(":")[0].strip() == "train" and "1 entries" in line for line in lines)
    assert any("toy files: 1" in line for line in lines)
    assert lines[-1] == f"total: {cache._human(total)}"

    # The default location is $MADMINER_SWEEPER_CACHE, as for paths.cache_dir.
    by_env = _cli("info", env={**ENV, "MADMINER_SWEEPER_CACHE": str(root)}, cwd=tmp_path)
    assert by_env.stdout == info.stdout
    cleared = _cli("clear", env={**ENV, "MADMINER_SWEEPER_CACHE": str(root)}, cwd=tmp_path)
    assert cleared.returncode == 0
    assert cleared.stdout.strip() == f"cleared {root.resolve()}: freed {cache._human(total)}"
    assert not root.exists()

    env = {k: v for k, v in ENV.items() if k != "MADMINER_SWEEPER_CACHE"}
    default = _cli("info", env=env, cwd=tmp_path)
    where = tmp_path.resolve() / ".cache" / "madminer-sweeper"
    assert default.stdout.splitlines()[0] == f"cache: {where} (does not exist yet)"


def test_command_line_refuses_a_file_as_cache_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    out = _cli("clear", "--dir", str(tmp_path / "f"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == f"error: cache dir {tmp_path / 'f'} is a file; pass --dir pointing to a folder"
    assert (tmp_path / "f").read_text() == "x"
