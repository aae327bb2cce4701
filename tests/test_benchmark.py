"""`advcl benchmark`: every (encoder, scheme, target) cell finetuned under the protocol and
evaluated, kept in the benchmark folder under a key of the encoder's sha256 and the cell's
settings, loaded instead of recomputed, resumed after an interruption; results.json,
leaderboard.md and the chart; CIFAR-10-C from a folder, the STL-10 transfer, AutoAttack, and
the evaluation sharded under torchrun."""

import contextlib
import io
import json
import os
import shutil
import tarfile

import pytest
import torch

from advcl_cli.checkpoint import load_checkpoint, read_metadata, sha256_file
from advcl_cli.data.corruptions import CORRUPTIONS, PUBLISHED, Published, load_corruptions
from advcl_cli.engine import benchmark as engine
from advcl_cli.engine.evaluate import corruption_accuracy
from advcl_cli.settings import BenchmarkSettings
from fakedata import allow_fake_archives, write_cifar10, write_cifar_c, write_stl10
from test_finetune import make_encoder
from test_leaderboard import parse
from waiting import HANG_S

# seconds per cell on a CPU: 2 epochs of 64 images at 16x16, 24 test images in blocks of 10, PGD-5 for RA
SMOKE = ["--dataset", "digits", "--epochs", "2", "--batch-size", "32", "--limit", "64", "--image-size", "16",
         "--eval-limit", "24", "--eval-batch-size", "10", "--attack", "pgd5", "--device", "cpu"]
PATHS = ("encoder", "encoder_path", "classifier", "classifier_sha256", "seconds", "timings", "settings")


def main(*args):
    """``advcl ARGS`` in-process outside a test's fixtures: (exit code, stdout, stderr)."""
    from advcl_cli.cli.app import main as advcl

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = advcl([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One digits benchmark of a tiny encoder with the three schemes, run to the end."""
    root = tmp_path_factory.mktemp("bench")
    enc = make_encoder(root / "enc.safetensors")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("ADVCL_") and k != "ADVCL_DATA_DIR"]:
            mp.delenv(key)
        code, out, err = main("benchmark", enc, *SMOKE, "--out", root / "out")
    assert code == 0, err
    return {"enc": enc, "out": root / "out", "stdout": out, "stderr": err,
            "records": json.loads((root / "out" / "results.json").read_text())}


def numbers(record):
    """A record without what depends on where and when it ran."""
    out = {k: v for k, v in record.items() if k not in PATHS}
    out["settings"] = {"finetune": {k: v for k, v in record["settings"]["finetune"].items() if k not in ("out", "data_dir")},
                       "evaluate": record["settings"]["evaluate"]}
    return out


def weights(record):
    return load_checkpoint(record["classifier"]).tensors


def test_the_digits_benchmark_writes_every_cell_results_leaderboard_and_chart(finished):
    out, records = finished["out"], finished["records"]
    assert finished["stdout"].strip() == str(out / "results.json")
    sha = sha256_file(finished["enc"])
    assert [(r["scheme"], r["dataset"], r["sha256"], r["method"]) for r in records] == [
        (s, "digits", sha, "advcl") for s in ("slf", "alf", "aff")]
    for r in records:
        assert r["key"].startswith(f"{sha[:12]}-{r['scheme']}-digits-")
        assert json.loads((out / "cells" / f"{r['key']}.json").read_text()) == r  # the cell's own artifact
        assert r["n"] == 24 and set(r["per_image"]) == {"clean", "pgd20@8/255", "pgd5@8/255", "worst@8/255"}
        assert all(len(f) == 24 for f in r["per_image"].values())
        assert r["sa"] == r["per_image"]["clean"].count("1") / 24
        assert r["ra"] == r["per_image"]["pgd5@8/255"].count("1") / 24 and r["ra_attack"] == "pgd5" and r["aa"] is None
        assert r["pgd20"] == r["per_image"]["pgd20@8/255"].count("1") / 24 <= r["sa"]
        assert r["corruptions"] == "digits-c" and set(r["ca_by_corruption"]) == set(CORRUPTIONS)
        assert r["ca"] == pytest.approx(sum(r["ca_by_corruption"].values()) / 15)
        assert r["seconds"] > 0 and r["deviations"] == ["epochs=2", "batch_size=32", "limit=64", "eval_limit=24",
                                                        "image_size=16", "attack=pgd5"]
        meta = read_metadata(r["classifier"])
        assert (meta.kind, meta.config["scheme"], meta.parent) == ("classifier", r["scheme"], sha)
        assert "pgd20_acc" not in meta.metrics  # PGD-20 once per cell: the cell's evaluation, not the finetuning's too
    # the protocol of the encoder's method fills what the smoke flags left: lr and milestones per scheme
    ft = {r["scheme"]: r["settings"]["finetune"] for r in records}
    assert [(ft[s]["epochs"], ft[s]["batch_size"], ft[s]["lr"], ft[s]["milestones"]) for s in ("slf", "alf", "aff")] == [
        (2, 32, 0.01, [15, 20]), (2, 32, 0.01, [15, 20]), (2, 32, 0.1, [15, 20])]
    assert len({r["classifier_sha256"] for r in records}) == 3
    assert 0 < sum(r["sa"] for r in records) and len({r["per_image"]["clean"] for r in records}) > 1

    header, rows = parse((out / "leaderboard.md").read_text())
    assert len(rows) == 1 and rows[0][:3] == [f"{finished['enc']} ({sha[:8]})", "advcl", "digits"]  # nothing published on digits
    row = dict(zip(header, rows[0]))
    for r in records:
        s = r["scheme"].upper()
        assert [row[f"{s} RA"], row[f"{s} CA"], row[f"{s} SA"]] == [f"{100 * r[k]:.2f}" for k in ("ra", "ca", "sa")]
    assert "Not the published protocol" in (out / "leaderboard.md").read_text()
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "benchmark: 3/3 cells done" in finished["stderr"] and "ALF" in finished["stderr"]


def test_a_second_call_loads_the_finished_cells_without_training(finished, run_cli, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a finished cell was computed again")

    for name in ("finetune", "evaluate", "corruption_accuracy"):
        monkeypatch.setattr(engine, name, never)
    code, out, err = run_cli("benchmark", finished["enc"], *SMOKE, "--out", finished["out"], "--json")
    assert code == 0, err
    assert json.loads(out) == finished["records"]
    assert err.count("cached") == 3 and "3 cells: 3 done, 0 to run" in err


def test_another_evaluation_makes_new_cells_on_the_same_finetuned_classifiers(finished, run_cli, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    args = [a if a != "pgd5" else "pgd3" for a in SMOKE]
    code, _, err = run_cli("benchmark", finished["enc"], *args, "--schemes", "aff", "--out", out)
    assert code == 0, err
    (new,) = json.loads((out / "results.json").read_text())
    old = finished["records"][2]
    assert new["ra_attack"] == "pgd3" and len(list((out / "cells").iterdir())) == 4
    assert "already finished all 2 epochs" in err and "finetuning:" not in err
    assert new["key"] != old["key"] and new["classifier_sha256"] == old["classifier_sha256"]
    assert new["per_image"]["pgd20@8/255"] == old["per_image"]["pgd20@8/255"]


def test_an_edited_cell_is_computed_again_with_a_warning(finished, run_cli, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    paths = []
    for record, edit in zip(finished["records"], ({"sa": "99%"}, {"pgd20": 1.5})):  # a text, a value no evaluation gives
        path = out / "cells" / f"{record['key']}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
        paths.append(path)
    code, stdout, err = run_cli("benchmark", finished["enc"], *SMOKE, "--schemes", "slf,alf", "--out", out, "--json")
    assert code == 0, err
    assert f"warning: {paths[0]} is unreadable (its sa '99%': " in err
    assert f"warning: {paths[1]} is unreadable (its pgd20 1.5 is not an accuracy in [0, 1]); computing the cell again" in err
    assert "2 cells: 0 done, 2 to run" in err
    assert [numbers(r) for r in json.loads(stdout)] == [numbers(r) for r in finished["records"][:2]]


def test_an_interrupted_benchmark_resumes_and_ends_as_an_uninterrupted_one(finished, run_cli, monkeypatch, tmp_path):
    from advcl_cli.cli.output import ConsoleReporter

    out = tmp_path / "out"
    real = ConsoleReporter.advance
    seen = []

    def advance(self, n=1, **info):  # Ctrl-C in the second epoch of ALF (2 steps an epoch), the second cell
        seen.append(self.name)
        if seen.count("finetune alf") == 3:
            raise KeyboardInterrupt
        real(self, n, **info)

    monkeypatch.setattr(ConsoleReporter, "advance", advance)
    args = ["benchmark", finished["enc"], *SMOKE, "--schemes", "slf,alf", "--out", out]
    code, _, err = run_cli(*args)
    assert code == 130 and "error: interrupted" in err and "run the same command again" in err
    assert len(list((out / "cells").iterdir())) == 1  # SLF finished, ALF not
    assert json.loads((out / "results.json").read_text())[0]["scheme"] == "slf"

    monkeypatch.setattr(ConsoleReporter, "advance", real)
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert "2 cells: 1 done, 1 to run" in err and "resuming after epoch 1" in err
    records = json.loads((out / "results.json").read_text())
    assert [numbers(r) for r in records] == [numbers(r) for r in finished["records"][:2]]
    for new, old in zip(records, finished["records"]):
        a, b = weights(new), weights(old)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cifar10_c_folder_is_read_and_scored(finished, run_cli, monkeypatch, tmp_path):
    allow_fake_archives(monkeypatch)
    data = write_cifar10(tmp_path / "data", n_train=64, n_test=12)
    folder, _, _ = write_cifar_c(tmp_path / "c", n=6)
    args = ["benchmark", finished["enc"], *SMOKE, "--dataset", "cifar10", "--schemes", "slf", "--data-dir", data,
            "--out", tmp_path / "out"]
    code, _, err = run_cli(*args, "--corruptions", folder)
    assert code == 0, err
    (r,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (r["dataset"], r["corruptions"], r["n"]) == ("cifar10", "cifar10-c", 12)
    model = load_checkpoint(r["classifier"]).build()
    want = corruption_accuracy(model, load_corruptions("cifar10-c", folder=folder, image_size=16))
    assert r["ca"] == want["ca"] and r["ca_by_corruption"] == want["by_corruption"]
    # the published AdvCL numbers on CIFAR-10 (RobustSSL: SLF RA 43.18, CA 73.14, SA 82.36) under ours
    header, rows = parse((tmp_path / "out" / "leaderboard.md").read_text())
    assert rows[1][0].startswith("reported: AdvCL") and rows[1][1:] == ["advcl", "cifar10", "43.18", "73.14", "82.36"]

    # without a folder, and none in the data folder: CA is skipped with a warning, the classifier reused
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert "warning: no cifar10-c in" in err and "CA is not measured" in err and "already finished" in err
    assert "--download-corruptions" in err
    assert json.loads((tmp_path / "out" / "results.json").read_text())[0]["ca"] is None

    # --download-corruptions gets the archive into the data folder (a local URL stands in for zenodo)
    archive = tmp_path / "zenodo" / "CIFAR-10-C.tar"
    archive.parent.mkdir()
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="CIFAR-10-C")
    monkeypatch.setitem(PUBLISHED, "cifar10-c", Published(archive.as_uri(), "CIFAR-10-C", 10))
    code, _, err = run_cli(*args, "--download-corruptions")
    assert code == 0, err
    assert f"getting cifar10-c ({archive.as_uri()}" in err and (data / "CIFAR-10-C" / "labels.npy").is_file()
    (r,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["ca"] == want["ca"] and r["ca_by_corruption"] == want["by_corruption"]


def test_a_missing_or_broken_corruption_folder_stops_before_any_work(finished, run_cli, monkeypatch, tmp_path):
    args = ["benchmark", finished["enc"], *SMOKE, "--dataset", "cifar10", "--out", tmp_path / "out"]
    code, out, err = run_cli(*args, "--corruptions", tmp_path / "nope")
    assert code == 2 and out == ""
    assert err.splitlines()[0] == f"error: corruption folder {tmp_path / 'nope'} does not exist"
    assert err.splitlines()[1].startswith("hint: ") and len(err.splitlines()) == 2
    folder, _, _ = write_cifar_c(tmp_path / "c", n=2)
    (folder / "fog.npy").unlink()
    code, _, err = run_cli(*args, "--corruptions", folder)
    assert code == 2 and f"error: {folder} lacks fog.npy" in err
    # a download that cannot reach its URL: exit 1 naming the URL and the data folder
    url = "http://127.0.0.1:9/CIFAR-10-C.tar"  # nothing listens there
    monkeypatch.setitem(PUBLISHED, "cifar10-c", Published(url, "CIFAR-10-C", 10))
    code, _, err = run_cli(*args, "--download-corruptions", "--data-dir", tmp_path / "data")
    assert code == 1 and f"error: could not get cifar10-c from {url} into {tmp_path / 'data'}" in err
    assert not (tmp_path / "out").exists()  # nothing was trained, loaded or written


def test_bad_input_is_refused_in_one_line(finished, run_cli, tmp_path):
    for args, message in [
        (["--schemes", "slf,xyz"], "unknown scheme 'xyz'"),
        (["--attack", "nope"], "unknown attack 'nope'"),
        (["--transfer", "svhn"], "unknown dataset 'svhn'"),
    ]:
        code, _, err = run_cli("benchmark", finished["enc"], *SMOKE, *args, "--out", tmp_path / "out")
        assert code == 2 and message in err.splitlines()[0], err
    code, _, err = run_cli("benchmark", tmp_path / "missing.safetensors", "--out", tmp_path / "out")
    assert code == 2 and "no such checkpoint file" in err
    code, _, err = run_cli("benchmark", stdin="")
    assert code == 2 and "no ENCODER given" in err
    assert not (tmp_path / "out").exists()


def test_transfer_to_stl10_finetunes_and_evaluates_at_32x32(finished, run_cli, monkeypatch, tmp_path):
    allow_fake_archives(monkeypatch)
    data = write_stl10(tmp_path / "data", n_train=32, n_test=10)
    code, _, err = run_cli("benchmark", *SMOKE, "--schemes", "slf", "--transfer", "stl10", "--data-dir", data,
                           "--out", tmp_path / "out", stdin=f"{finished['enc']}\n")  # the encoder's path on stdin
    assert code == 0, err
    mine, transfer = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (mine["dataset"], transfer["dataset"], transfer["finetune_dataset"]) == ("digits", "digits->stl10", "stl10")
    assert transfer["n"] == 10 and transfer["ca"] is None and transfer["settings"]["evaluate"]["image_size"] == 32
    meta = read_metadata(transfer["classifier"])
    assert (meta.dataset, meta.config["image_size"]) == ("stl10", 32)
    assert numbers(mine) == numbers(finished["records"][0])  # the in-domain cell is the same cell
    header, rows = parse((tmp_path / "out" / "leaderboard.md").read_text())
    assert [r[2] for r in rows] == ["digits", "digits->stl10"]


def test_every_deviation_from_the_published_protocol_is_recorded(finished, run_cli, tmp_path):
    """bf16 finetuning (the benchmark trains in fp32), a seed other than the default and a DeACL
    stem other than the benchmark's network are listed with the smoke flags; an fp32 cell with
    the protocol's settings lists none."""
    code, _, err = run_cli("benchmark", finished["enc"], *SMOKE, "--schemes", "slf", "--precision", "bf16",
                           "--out", tmp_path / "out")
    assert code == 0, err
    (record,) = json.loads((tmp_path / "out" / "results.json").read_text())
    bf16 = "precision=bf16 (the benchmark finetunes in fp32)"
    assert record["deviations"] == [*finished["records"][0]["deviations"], bf16]
    assert bf16 in (tmp_path / "out" / "leaderboard.md").read_text()
    assert all(bf16 not in r["deviations"] for r in finished["records"])  # fp32 on a CPU

    meta = read_metadata(finished["enc"])
    protocol = BenchmarkSettings()
    assert engine.deviations(protocol, "fp32", meta) == []
    assert engine.deviations(protocol, "bf16", meta) == [bf16]
    assert engine.deviations(BenchmarkSettings(seed=7), "fp32", meta) == ["seed=7"]
    deacl = meta.model_copy(update={"method": "deacl", "model": {**meta.model, "stem_padding": 2}})
    assert [d.split(" ")[0] for d in engine.deviations(protocol, "fp32", deacl)] == ["stem_padding=2"]
    assert engine.deviations(protocol, "fp32", deacl.model_copy(update={"model": meta.model})) == []


def test_ra_is_autoattack_by_default(finished, run_cli, tmp_path):
    # 4 test images at a large eps, so APGD-CE breaks them before FAB-T and Square (slow on a CPU)
    args = [a for a in SMOKE if a not in ("--attack", "pgd5")]
    code, out, err = run_cli("benchmark", finished["enc"], *args, "--schemes", "slf", "--eval-limit", "4",
                             "--eps", "24/255", "--out", tmp_path / "out", "--json")
    assert code == 0, err
    (r,) = json.loads(out)
    assert r["ra_attack"] == "autoattack" and r["ra"] == r["aa"] == r["per_image"]["autoattack@24/255"].count("1") / 4
    assert "AutoAttack standard" in r["attacks"]["autoattack"] and r["n"] == 4
    text = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "RA: robust accuracy under AutoAttack (standard, L-inf eps 24/255)" in text


def test_the_evaluation_runs_sharded_under_torchrun_with_the_numbers_of_one_process(finished, tmp_path):
    from test_distributed import torchrun

    # the finished SLF cell evaluated again on 2 processes (its classifier reused): the 24 test
    # images are 3 blocks of 10, rank 0 takes two, rank 1 one; CA's splits are sharded the same way
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    for cell in (out / "cells").iterdir():
        cell.unlink()
    two = torchrun(2, "-m", "advcl_cli", "benchmark", str(finished["enc"]), *SMOKE, "--schemes", "slf", "--out", str(out),
                   timeout=HANG_S)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip() == str(out / "results.json")  # rank 0 alone prints
    assert two.stderr.count("already finished all 2 epochs") == 1 and "finetuning:" not in two.stderr
    (record,) = json.loads((out / "results.json").read_text())
    assert numbers(record) == numbers(finished["records"][0])
