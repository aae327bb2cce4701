"""The pretraining loop: schedule, run folder, metrics, checkpoints, the NaN/inf guard."""

import json
import math

import pytest
import torch

from advcl_cli.settings.layering import resolve
from advcl_cli.checkpoint import load_checkpoint, load_state, sha256_file
from advcl_cli.engine.pretrain import make_method, pretrain
from advcl_cli.report import RecordingReporter
from advcl_cli.engine.run import FiniteGuard, RunDir, check_resume_config
from advcl_cli.errors import TrainingError, UsageError
from advcl_cli.methods.advcl import AdvCL
from advcl_cli.models import create_model
from advcl_cli.settings import PretrainSettings


def tiny(**overrides):
    base = dict(dataset="digits", arch="resnet18-tiny", limit=64, batch_size=32, epochs=2, out="run", device="cpu")
    if overrides.get("method", "advcl") == "advcl":
        base["pgd_steps"] = 1
    return resolve(PretrainSettings, {**base, **overrides})


# --- schedule -------------------------------------------------------------------------------


def test_warmup_follows_the_batch_size_rule_unless_given():
    def warmup(**kw):
        return make_method(resolve(PretrainSettings, kw), 8).schedule().warmup_epochs

    assert warmup(batch_size=512) == 10
    assert warmup(batch_size=256) == 0
    assert warmup(batch_size=64, warmup_epochs=3) == 3
    assert warmup(batch_size=512, epochs=4) == 4


def test_a_run_writes_metrics_encoder_and_state(tmp_path):
    rep = RecordingReporter()
    result = pretrain(tiny(save_every=1), rep)
    assert result.path.resolve() == tmp_path / "run" / "encoder.safetensors" and result.epochs == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert {"epoch", "lr", "loss", "contrast", "images_per_s", "seconds"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0
    assert lines[1]["lr"] == pytest.approx(0.5e-3)
    ckpt = load_checkpoint(result.path, kind="encoder")
    assert ckpt.meta.method == "advcl" and ckpt.meta.dataset == "digits"
    assert ckpt.meta.eps == pytest.approx(8 / 255) and ckpt.meta.metrics["epoch"] == 2
    assert ckpt.meta.config["epochs"] == 2 and ckpt.meta.config["pgd_steps"] == 1
    assert ckpt.model_config.bn_sets == ("normal", "pgd", "pgd_ce") and ckpt.model_config.proj_dim == 128
    state = load_state(tmp_path / "run" / "state.safetensors")
    assert state["epoch"] == 2 and state["finished"] and state["config"]["seed"] == 0
    assert any(e[0] == "warn" and "pseudo-label" in e[1] for e in rep.events)
    assert sum(e[1] for e in rep.events if e[0] == "advance") == 4  # 2 epochs x 2 steps


def test_simclr_run_and_default_folder(tmp_path):
    result = pretrain(tiny(method="simclr", epochs=1, out=None))
    assert result.run_dir.resolve() == tmp_path / "runs" / "simclr-digits-resnet18-tiny"
    ckpt = load_checkpoint(result.path)
    assert ckpt.meta.method == "simclr" and ckpt.meta.eps is None and ckpt.model_config.bn_sets == ("normal",)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = load_checkpoint(pretrain(tiny(method="simclr", epochs=1, out="a")).path).tensors
    b = load_checkpoint(pretrain(tiny(method="simclr", epochs=1, out="b")).path).tensors
    c = load_checkpoint(pretrain(tiny(method="simclr", epochs=1, out="c", seed=1)).path).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["backbone.conv1.weight"], c["backbone.conv1.weight"])


def test_finished_run_is_refused_without_force(tmp_path):
    settings = tiny(method="simclr", epochs=1)
    first = pretrain(settings)
    digest = sha256_file(first.path)
    with pytest.raises(UsageError, match="finished run") as err:
        pretrain(settings)
    assert "--force" in err.value.hint and sha256_file(first.path) == digest
    pretrain(tiny(method="simclr", epochs=1, seed=3), force=True)
    assert sha256_file(first.path) != digest
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_needs_state_and_same_settings(tmp_path):
    with pytest.raises(UsageError, match="nothing to resume"):
        pretrain(tiny(), resume=True)
    with pytest.raises(UsageError, match="contradict"):
        pretrain(tiny(), resume=True, force=True)
    with pytest.raises(UsageError, match="epochs is 3 now but 2"):
        check_resume_config({"epochs": 2, "device": "cpu"}, {"epochs": 3, "device": "cuda"}, {"device"})


def test_resume_of_a_finished_run_returns_its_encoder(tmp_path):
    settings = tiny(method="simclr", epochs=1)
    first = pretrain(settings)
    digest = sha256_file(first.path)
    again = pretrain(settings, resume=True)
    assert again.path == first.path and sha256_file(first.path) == digest


def test_unfinished_run_is_refused_without_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    net = create_model("resnet18-tiny")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    run.save_state(net, opt, epoch=1, total_epochs=3, config={})
    with pytest.raises(UsageError, match="unfinished run \\(1 of 3") as err:
        pretrain(tiny())
    assert "--resume" in err.value.hint


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = AdvCL.step

    def step(self, *args, **kwargs):
        loss, terms = original(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), terms  # epoch 2, step 2

    monkeypatch.setattr(AdvCL, "step", step)
    with pytest.raises(TrainingError, match="epoch 2, step 2") as err:
        pretrain(tiny(epochs=3, save_every=1))
    assert err.value.exit_code == 1 and "encoder.safetensors (epoch 1)" in err.value.message
    ckpt = load_checkpoint(tmp_path / "run" / "encoder.safetensors")
    assert ckpt.meta.metrics["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt.tensors.values())
    assert load_state(tmp_path / "run" / "state.safetensors")["epoch"] == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_finite_guard_reports_the_first_bad_step():
    guard = FiniteGuard()
    for step, value in enumerate([1.0, 2.0, float("inf"), float("nan")]):
        guard.update(torch.tensor(value), step)
    with pytest.raises(TrainingError, match="epoch 7, step 3"):
        guard.check(7, "no encoder was saved yet")
    ok = FiniteGuard()
    ok.update(torch.tensor(1.0), 0)
    ok.check(1, "")


def test_metrics_are_cut_back_to_the_saved_state_on_resume(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    net = create_model("resnet18-tiny")
    run.save_state(net, torch.optim.SGD(net.parameters(), lr=0.1), epoch=1, total_epochs=3, config={})
    for e in (1, 2):
        run.append_metrics({"epoch": e, "loss": 1.0})
    with open(run.metrics_path, "a") as f:
        f.write('{"epoch": 3, "lo')  # a line torn by a crash
    state = run.check(resume=True, force=False)
    assert len(run.read_metrics()) == 2  # checking changes nothing
    run.begin(state)
    assert state["epoch"] == 1 and [r["epoch"] for r in run.read_metrics()] == [1]
    assert run.metrics_path.read_text() == '{"epoch": 1, "loss": 1.0}\n'
