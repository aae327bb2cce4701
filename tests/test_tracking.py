"""Experiment tracking (--log tensorboard,wandb) and the kNN monitor (--monitor-every): the curves
read back from TensorBoard's event files and W&B's offline run, the kNN vote against references
written here, the feature-space attack, and that neither changes what is trained."""

import json
import math
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from advcl_cli.checkpoint import load_checkpoint, load_state
from advcl_cli.settings.layering import resolve
from advcl_cli.data.augment import to_float
from advcl_cli.data.registry import load_dataset
from advcl_cli.engine import monitor as monitor_module
from advcl_cli.engine.monitor import Monitor, knn_predict
from advcl_cli.engine.pretrain import pretrain
from advcl_cli.models import create_model
from advcl_cli.settings import PretrainSettings
from training import InterruptAt

SMALL = ["--dataset", "digits", "--arch", "resnet18-tiny", "--limit", "64", "--batch-size", "32", "--device", "cpu",
         "--method", "simclr", "--epochs", "2"]
TRACKED = ["--log", "tensorboard,wandb", "--monitor-every", "1"]


def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_hparams(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(folder))
    events.Reload()
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.session_start_info.hparams.items()}


def wandb_records(path: Path):
    """The records of an offline W&B run file: W&B's LevelDB-style log (a 7-byte file header, then
    32 KiB blocks of records, each with a 7-byte header: crc32c, length, type 1 full / 2 first /
    3 middle / 4 last), each record a protobuf ``Record``."""
    from wandb.proto.wandb_internal_pb2 import Record

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if left < 7 or (kind == 0 and n == 0):  # a block's zero padding
            pos += left
            continue
        parts += raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def wandb_runs(run_dir: Path) -> list[dict]:
    """Every offline W&B run in a run folder: its id, config and history rows (oldest first)."""
    runs = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        found = {"history": []}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["id"] = record.run.run_id
                found["config"] = {u.key: json.loads(u.value_json) for u in record.run.config.update}
            elif kind == "history":
                found["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                         for i in record.history.item})
        runs.append(found)
    return runs


def test_an_interrupted_tracked_run_resumes_into_the_same_curves(run_cli, tmp_path, monkeypatch):
    """A digits run with --log tensorboard,wandb and the monitor, interrupted in its second epoch
    and resumed: TensorBoard and W&B hold every epoch of metrics.jsonl once (the resumed W&B run
    has the first run's id), the settings are the hyper-parameters, and the encoder is the one a
    plain run trains (tracking and monitoring change nothing)."""
    offline_wandb(monkeypatch, tmp_path)
    settings = resolve(PretrainSettings, {"dataset": "digits", "arch": "resnet18-tiny", "limit": 64, "batch_size": 32,
                                          "device": "cpu", "method": "simclr", "epochs": 2, "log": "tensorboard,wandb",
                                          "monitor_every": 1, "out": "tracked"})
    with pytest.raises(KeyboardInterrupt):
        pretrain(settings, InterruptAt(3))  # 2 steps per epoch: step 3 is in epoch 2
    run = tmp_path / "tracked"
    first_id = load_state(run / "state.safetensors")["tracking"]["wandb_id"]
    code, out, err = run_cli("pretrain", *SMALL, *TRACKED, "--out", "tracked", "--resume")
    assert code == 0, err
    assert out.strip() == str(Path("tracked/encoder.safetensors"))  # W&B writes nothing to stdout

    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0 <= r["knn_acc"] <= 1 and 0 <= r["knn_pgd_acc"] <= 1 for r in epochs)
    curves = tensorboard_scalars(run / "tensorboard")
    for name in ("loss", "contrast", "lr", "images_per_s", "seconds", "knn_acc", "knn_pgd_acc"):
        assert curves[name] == [(r["epoch"], pytest.approx(r[name], rel=1e-6)) for r in epochs], name
    assert tensorboard_hparams(run / "tensorboard")["method"] == "simclr"

    runs = wandb_runs(run)
    assert len(runs) == 2 and {r["id"] for r in runs} == {first_id}  # the resumed run continues the first
    assert runs[0]["config"]["method"] == "simclr" and runs[0]["config"]["monitor_every"] == 1
    rows = {row["_step"]: row for r in runs for row in r["history"]}
    assert sorted(rows) == [1, 2]
    for r in epochs:
        assert rows[r["epoch"]]["loss"] == pytest.approx(r["loss"]) and rows[r["epoch"]]["knn_acc"] == r["knn_acc"]

    code, out, err = run_cli("pretrain", *SMALL, "--out", "plain")
    assert code == 0, err
    tracked, plain = (load_checkpoint(p).tensors for p in (run / "encoder.safetensors", out.strip()))
    assert tracked.keys() == plain.keys() and all(torch.equal(tracked[k], plain[k]) for k in plain)


@pytest.mark.parametrize("verb", ["finetune", "lpaft"])
def test_finetune_and_lpaft_log_to_tensorboard_and_start_over_with_force(run_cli, tmp_path, verb):
    torch.manual_seed(0)
    from advcl_cli.checkpoint import save_model

    enc = save_model(tmp_path / "enc.safetensors", create_model("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=8),
                     kind="encoder", method="dynacl", dataset="digits", eps=8 / 255)
    extra = (["--scheme", "slf", "--epochs", "1", "--eval-limit", "0"] if verb == "finetune"
             else ["--probe-epochs", "1", "--epochs", "1", "--attack-steps", "1"])
    args = [verb, enc, "--limit", "32", "--batch-size", "16", "--image-size", "16", "--device", "cpu", *extra,
            "--out", "r", "--log", "tensorboard"]
    for again in ([], ["--force"]):  # a run started over: TensorBoard shows the new run's epochs only
        code, out, err = run_cli(*args, *again)
        assert code == 0, err
        epochs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
        curves = tensorboard_scalars(tmp_path / "r" / "tensorboard")
        for name in ("loss", "seconds"):
            assert epochs and curves[name] == [(r["epoch"], pytest.approx(r[name], rel=1e-6)) for r in epochs]


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_a_tracker_without_its_extra_is_refused_before_anything_runs(run_cli, tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # the import fails, as without the package
    code, out, err = run_cli("pretrain", *SMALL, "--log", "tensorboard,wandb", "--out", "r")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"pip install 'advcl[{tracker}]'" in err and "--log" in err
    assert not (tmp_path / "r").exists()
    code, out, err = run_cli("pretrain", *SMALL, "--log", "mlflow", "--out", "r")
    assert code == 2 and "unknown tracker 'mlflow'" in err and not (tmp_path / "r").exists()


def test_a_wandb_run_that_cannot_start_is_one_line_before_training(run_cli, tmp_path, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", refuse)
    code, out, err = run_cli("pretrain", *SMALL, "--log", "wandb", "--out", "r")
    assert code == 2 and out == "" and err.count("\n") == 2 and "Traceback" not in err, err  # error + hint
    assert "W&B could not start the run: api_key not configured" in err and "WANDB_MODE=offline" in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


# --- the kNN vote --------------------------------------------------------------------------


def test_knn_vote_on_a_hand_built_bank():
    """Query (1, 0) among a (cos 1, class 0), b and c (cos 0.8, class 1), d (cos -1, class 0).
    k 3, T 0.1: e^10 for class 0 beats 2 e^8; T 1: 2 e^0.8 = 4.45 beats e^1 = 2.72; k 1: a alone;
    k 4, T 1: d adds e^-1 to class 0 (3.09), still below 4.45."""
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]]) * torch.tensor([[2.0], [5.0], [0.5], [3.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[3.0, 0.0]])  # lengths do not matter: cosine
    assert knn_predict(query, bank, labels, 2, k=3, temperature=0.1).tolist() == [0]
    assert knn_predict(query, bank, labels, 2, k=3, temperature=1.0).tolist() == [1]
    assert knn_predict(query, bank, labels, 2, k=1, temperature=1.0).tolist() == [0]
    assert knn_predict(query, bank, labels, 2, k=4, temperature=1.0).tolist() == [1]
    assert knn_predict(query, bank, labels, 2, k=200, temperature=1.0).tolist() == [1]  # k beyond the bank: all of it


def test_knn_vote_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(500, 16, generator=g), torch.randn(300, 16, generator=g)  # 300: more than one chunk
    labels = torch.randint(0, 7, (500,), generator=g)
    expected = []
    for q in query:
        sims = (bank @ q) / (bank.norm(dim=1) * q.norm())
        votes = [0.0] * 7
        for i in sims.argsort(descending=True)[:200].tolist():
            votes[int(labels[i])] += math.exp(float(sims[i]) / 0.1)
        expected.append(max(range(7), key=votes.__getitem__))
    assert knn_predict(query, bank, labels, 7).tolist() == expected


# --- the feature-space attack ----------------------------------------------------------------


def test_the_adversarial_monitor_attacks_the_features(monkeypatch):
    """The adversarial queries are not the clean ones: they are farther from the clean features
    (cosine) than random noise of the same budget, and the model, its mode and the global random
    stream are as they were."""
    data = load_dataset("digits", "train", limit=96, image_size=16)
    train, test = data, load_dataset("digits", "test", limit=48, image_size=16)
    torch.manual_seed(0)
    model = create_model("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=8)
    model.train()
    queries = []
    real = knn_predict
    monkeypatch.setattr(monitor_module, "knn_predict", lambda q, *a, **kw: queries.append(q) or real(q, *a, **kw))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    found = Monitor(train, test, every=1, epochs=1, eps=8 / 255, seed=0)(model, 1)
    assert set(found) == {"knn_acc", "knn_pgd_acc"} and len(queries) == 2
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    clean, adv = queries
    model.eval()
    with torch.no_grad():
        x = to_float(test.images)
        assert torch.allclose(clean, model.features(x, "pgd"), atol=1e-5)  # the pgd BN set
        noise = (x + (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 1) * 8 / 255).clamp(0, 1)
        noisy = model.features(noise, "pgd")
    moved = 1 - F.cosine_similarity(adv, clean).mean()  # how far the attack moved the features
    by_noise = 1 - F.cosine_similarity(noisy, clean).mean()
    assert moved > 10 * by_noise, (moved, by_noise)


def test_the_monitor_runs_every_n_epochs_and_after_the_last(monkeypatch):
    monitor = Monitor(None, SimpleNamespace(images=torch.zeros(1)), every=3, epochs=7, eps=None, seed=0)
    monkeypatch.setattr(Monitor, "measure", lambda self, model, gen: {"knn_acc": 1.0})
    assert [done for done in range(1, 8) if monitor(None, done)] == [3, 6, 7]
