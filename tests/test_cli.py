import subprocess
import sys

import pytest

VERBS = ["pretrain", "pseudo-labels", "import", "finetune", "attack", "eval", "benchmark", "pull", "push", "zoo"]


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.startswith("advcl ")


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help_has_a_worked_example(run_cli, verb):
    code, out, _ = run_cli(*([verb] if verb else []), "--help")
    assert code == 0
    assert "Example" in out and "advcl " in out.split("Example", 1)[1]


def test_unknown_command_is_a_usage_error(run_cli):
    code, out, err = run_cli("nosuch")
    assert code == 2 and out == ""
    assert "No such command" in err and "Traceback" not in err


def test_errors_have_no_traceback_unless_debug(tmp_path):
    cmd = [sys.executable, "-m", "advcl_cli", "eval", str(tmp_path / "missing.safetensors")]
    quiet = subprocess.run(cmd, capture_output=True, text=True)
    assert quiet.returncode == 2 and quiet.stdout == ""
    assert "Traceback" not in quiet.stderr and len(quiet.stderr.strip().splitlines()) <= 2
    loud = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "ADVCL_DEBUG": "1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr
