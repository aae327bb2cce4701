"""`advcl pretrain` through the CLI: stdout is the path, errors are one line and an exit code."""

import json
from pathlib import Path

from advcl_cli.checkpoint import load_checkpoint

SMALL = ["--dataset", "digits", "--arch", "resnet18-tiny", "--limit", "64", "--batch-size", "32", "--device", "cpu"]
TINY = [*SMALL, "--pgd-steps", "1"]  # AdvCL's attack


def test_pretrain_prints_only_the_encoder_path(run_cli, tmp_path):
    code, out, err = run_cli("pretrain", *TINY, "--epochs", "1", "--out", "r")
    assert code == 0, err
    assert out.count("\n") == 1 and Path(out.strip()) == Path("r/encoder.safetensors")
    assert load_checkpoint(out.strip()).meta.config["batch_size"] == 32
    assert "pseudo-label term" in err and "training: advcl on digits (64 images)" in err
    assert (tmp_path / "r" / "metrics.jsonl").read_text().count("\n") == 1


def test_pretrain_json_and_finished_run_guard(run_cli, tmp_path):
    code, out, err = run_cli("pretrain", *SMALL, "--method", "simclr", "--epochs", "1", "--out", "r", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["epochs"] == 1 and doc["path"].endswith("encoder.safetensors") and doc["metrics"]["epoch"] == 1
    assert {"loss", "contrast", "lr", "images_per_s", "seconds"} <= doc["metrics"].keys()
    code, out, err = run_cli("pretrain", *SMALL, "--method", "simclr", "--epochs", "1", "--out", "r")
    assert code == 2 and out == "" and "finished run" in err and "--force" in err
    code, out, err = run_cli("pretrain", *SMALL, "--method", "simclr", "--epochs", "1", "--out", "r", "--force")
    assert code == 0 and out.strip().endswith("encoder.safetensors") and "warm-up" not in err
    # a run no longer than its warm-up ends at the peak learning rate: said once, on stderr
    code, out, err = run_cli("pretrain", *SMALL, "--method", "simclr", "--epochs", "1", "--warmup-epochs", "3",
                             "--out", "r", "--force")
    assert code == 0 and "warning: --epochs 1: the whole run is simclr's learning-rate warm-up" in err


def test_the_last_partial_batch_is_kept_unless_drop_last(run_cli, tmp_path):
    short = [a if a != "64" else "40" for a in TINY]  # 40 images: batches of 32 and 8
    code, out, err = run_cli("pretrain", *short, "--epochs", "1", "--out", "keep")
    assert code == 0, err
    assert "1 epoch of 2 steps" in err and load_checkpoint(out.strip()).meta.config["drop_last"] is False
    code, out, err = run_cli("pretrain", *short, "--epochs", "1", "--out", "drop", "--drop-last")
    assert code == 0, err
    assert "1 epoch of 1 step" in err and load_checkpoint(out.strip()).meta.config["drop_last"] is True


def test_resume_takes_the_settings_of_the_run(run_cli, tmp_path):
    code, out, err = run_cli("pretrain", *SMALL, "--method", "simclr", "--epochs", "1", "--out", "r", "--seed", "4")
    assert code == 0, err
    code, out2, err = run_cli("pretrain", "--out", "r", "--resume")  # nothing else given: the run's settings
    assert code == 0 and out2 == out and "already finished" in err
    code, out, err = run_cli("pretrain", "--out", "r", "--resume", "--epochs", "5")
    assert code == 2 and "epochs is 5 from --epochs but 1 in the run" in err


def test_usage_errors_exit_2_in_one_line(run_cli):
    cases = [
        (["pretrain", *TINY, "--method", "byol"], "unknown method 'byol'"),
        (["pretrain", *TINY, "--out", "nothing", "--resume"], "nothing to resume"),
        (["pretrain", *TINY, "--eps", "9"], "for --eps"),
        (["pretrain", *TINY, "--dataset", "cifar11"], "unknown dataset"),
        (["pretrain", *TINY, "--pseudo-labels", "missing.safetensors"], "no such pseudo-label file"),
        (["pretrain", *TINY, "--batch-size", "128"], "fewer than one batch"),
    ]
    for args, message in cases:
        code, out, err = run_cli(*args)
        assert code == 2 and out == "" and message in err and "Traceback" not in err, (args, err)


def test_help_has_worked_examples(run_cli):
    for cmd in (["pretrain"], ["import"], ["pseudo-labels"], ["pseudo-labels", "import"]):
        code, out, err = run_cli(*cmd, "--help")
        assert code == 0 and "Example" in out and "advcl " in out, cmd
