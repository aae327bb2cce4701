"""benchmarks/robustness_digits.py: the commands each row runs (RoCL, RCS, AutoLoRa beside the
first six) and its refusal of a row without its source, with `advcl` replaced by a recorder."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import robustness_digits as script  # noqa: E402


def fake_advcl(calls):
    def advcl(*args, env):
        args = [str(a) for a in args]
        calls.append(args)
        out = args[args.index("--out") + 1] if "--out" in args else ""
        if args[0] == "finetune":
            return json.dumps({"path": f"{out}/classifier.safetensors",
                               "metrics": {"clean_acc": 0.5, "pgd20_acc": 0.25, "n_eval": 360}})
        if args[0] == "eval":
            return json.dumps({"clean_acc": 0.5, "n": 120, "robust": [{"robust_acc": 0.125}]})
        return f"{out}/encoder.safetensors"
    return advcl


def test_the_new_rows_run_their_methods_with_the_scaled_schedules(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(script, "advcl", fake_advcl(calls))
    script.main(["--methods", "autolora,rcs,rocl,acl", "--out", str(tmp_path), "--no-record"])
    pretrain = {c[c.index("--out") + 1]: c for c in calls if c[0] == "pretrain"}
    rcs = pretrain[str(tmp_path / "rcs")]
    # the authors' --warmup 100 --fre 20 of 1000 epochs, at 15: first selection at epoch 2, then every epoch
    assert rcs[rcs.index("--method") + 1] == "acl"
    assert rcs[rcs.index("--coreset") + 1:rcs.index("--coreset") + 6] == ["0.2", "--coreset-warmup", "2",
                                                                            "--coreset-every", "1"]
    rocl = pretrain[str(tmp_path / "rocl")]
    assert rocl[rocl.index("--method") + 1] == "rocl" and rocl[rocl.index("--warmup-epochs") + 1] == "0"
    autolora = [c for c in calls if c[0] == "finetune" and "autolora" in c]
    assert len(autolora) == 1 and autolora[0][1] == str(tmp_path / "acl" / "encoder.safetensors")
    assert autolora[0][autolora[0].index("--epochs") + 1] == "3" and "--lr" not in autolora[0]
    assert str(tmp_path / "autolora") not in pretrain  # no pretraining of its own
    table = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| method", "| simclr", "| acl", "| rocl", "| rcs", "| autolora"]  # sources before their rows
    assert "| autolora | 50.00 | 25.00 | 12.50 | 50.00 | (acl's) |" in table


def test_a_row_without_its_source_encoder_is_refused(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(script, "advcl", fake_advcl(calls))
    with pytest.raises(SystemExit) as e:
        script.main(["--methods", "autolora", "--out", str(tmp_path), "--no-record"])
    assert e.value.code == 2 and not calls
    assert "autolora finetunes the acl encoder: add acl to --methods" in capsys.readouterr().err


@pytest.mark.parametrize("epochs, measuring", [(40, "3"), (4, "1")])  # the authors' 30 of 400, at least 1
def test_a_infonce_is_advcl_with_its_loss_from_a_reused_simclr_encoder(tmp_path, monkeypatch, capsys, epochs,
                                                                       measuring):
    calls = []
    monkeypatch.setattr(script, "advcl", fake_advcl(calls))
    simclr = str(tmp_path / "simclr.safetensors")
    script.main(["--methods", "a-infonce", "--simclr", simclr, "--epochs", str(epochs), "--out", str(tmp_path),
                 "--no-record"])
    assert [c[0] for c in calls] == ["pseudo-labels", "pretrain", "finetune", "eval"]  # no SimCLR run
    assert calls[0][calls[0].index("--encoder") + 1] == simclr
    labels = f"{tmp_path / 'pseudo-labels.safetensors'}/encoder.safetensors"  # what the fake pseudo-labels printed
    pretrain = calls[1]
    assert pretrain[pretrain.index("--method") + 1] == "advcl"
    at = pretrain.index("--pseudo-labels")
    assert pretrain[at + 1:at + 6] == [labels, "--a-infonce", "iphn", "--stpg-adaptive-epochs", measuring]
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows == ["| method", "| a-infonce"]
