"""`advcl pretrain --help` and `advcl finetune --help` from the help cache: without torch, the
same text as built from the methods, and rebuilt when a method's source changes."""

import os
import subprocess
import sys
from pathlib import Path

from advcl_cli.cli import helpcache

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import sys\n"
    "from advcl_cli.cli.app import main\n"
    "code = main(sys.argv[1:])\n"
    "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', code, file=sys.stderr)\n"
)


def advcl(cache: Path, *args):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=600)


def test_help_from_the_cache_is_the_same_and_needs_no_torch(tmp_path):
    text = {}
    for verb in ("pretrain", "finetune"):
        first = advcl(tmp_path, verb, "--help")  # builds the cache: imports the methods
        assert first.returncode == 0 and "TORCH 0" in first.stderr, first.stderr
        again = advcl(tmp_path, verb, "--help")
        assert again.returncode == 0 and "NO TORCH 0" in again.stderr, again.stderr
        assert again.stdout == first.stdout
        text[verb] = again.stdout
    assert "--hfc-radius" in text["pretrain"] and "Options of advcl" in text["pretrain"]
    assert "dynacl" in text["finetune"] and "aff:" in text["finetune"]  # the methods' protocols
    bad = advcl(tmp_path, "pretrain", "--hfc-radiuss", "4")  # a mistyped method option: refused without torch
    assert "NO TORCH 2" in bad.stderr and "--hfc-radius" in bad.stderr
    assert len(list((tmp_path / "advcl").glob("help-*.json"))) == 1


def test_the_key_changes_with_a_methods_source(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    (package / "methods").mkdir(parents=True)
    source = package / "methods" / "m.py"
    source.write_text("x = 1\n")
    monkeypatch.setattr(helpcache, "PACKAGE", package)
    before = helpcache.cache_key()
    assert helpcache.cache_key() == before
    source.write_text("x = 22\n")
    assert helpcache.cache_key() != before
    calls = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert helpcache.cached("x", lambda: calls.append(1) or {"a": 1}) == {"a": 1}
    assert helpcache.cached("x", lambda: calls.append(1) or {"a": 2}) == {"a": 1} and calls == [1]
