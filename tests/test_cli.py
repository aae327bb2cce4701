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


@pytest.mark.parametrize("verb", [*VERBS, "pseudo-labels import", "zoo list", "zoo info", "lpaft"])
def test_help_metavars_have_one_style(run_cli, verb, monkeypatch):
    import re

    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(*verb.split(), "--help")
    assert code == 0
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert not re.search(r"[{}<>]", usage), usage  # NAME, [NAME]: not {name}
    rows = [line for line in out.splitlines() if re.match(r"^│ [ *]*(-|[A-Z])", line)]
    assert rows
    for row in rows:  # INT, PATH, a|b, a name in capitals; never <str>, <bool>, <path>
        assert not re.search(r"<[a-z\[\]]+>|\{[a-z_]+\}", row), row


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
    assert loud.returncode == 2 and "Traceback" in loud.stderr  # the traceback, and still the usage error's code


def test_help_shows_only_budgets_as_k_over_255():
    from advcl_cli.cli.options import format_default, is_eps
    from advcl_cli.methods import get_method
    from advcl_cli.settings import EvalSettings

    def shown(settings, name):
        field = settings.model_fields[name]
        return format_default(field.default, is_eps(field))

    advcl, dynacl = get_method("advcl").Settings, get_method("dynacl").Settings
    assert shown(advcl, "eps") == "8/255" and shown(advcl, "pgd_step_size") == "2/255"
    assert shown(EvalSettings, "eps") == "8/255"  # a list of budgets
    assert shown(advcl, "ce_weight") == "0.2"  # 51/255 is a weight, not a budget
    assert shown(dynacl, "weight_swap") == "0.666667"
    assert shown(advcl, "warmup_epochs") == "rule"
    assert format_default(1e-20, True) == "1e-20"  # not 0/255


def test_help_keeps_bracketed_text_and_aligns_the_methods(run_cli):
    for verb in ("eval", "attack"):
        code, out, _ = run_cli(verb, "--help")
        assert code == 0 and "advcl[plot]" in out and "(needs advcl)." not in out, verb
    from advcl_cli.methods import method_names

    code, out, _ = run_cli("pretrain", "--help")
    columns = set()
    for name in method_names():
        line = next(line for line in out.splitlines() if line.split()[:1] == [name] and line.startswith("   "))
        columns.add(line.index(line.split()[1], line.index(name) + len(name)))
    assert code == 0 and len(columns) == 1, columns


def test_zoo_list_warns_about_an_unknown_advcl_variable(run_cli, monkeypatch):
    monkeypatch.setenv("ADVCL_ZOO_MANIFESTT", "team.toml")
    code, out, err = run_cli("zoo", "list")
    assert code == 0 and out
    assert "ADVCL_ZOO_MANIFESTT is not an advcl setting" in err and "did you mean ADVCL_ZOO_MANIFEST?" in err
