"""Two CPU processes (gloo, through torchrun) behave as one process with the global batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advcl_cli.checkpoint import load_checkpoint
from advcl_cli.models import create_model
from nets import acl_net, advcl_net
from waiting import HANG_S, wait_for

WORKER = str(Path(__file__).with_name("dist_worker.py"))


def launcher(n: int) -> list[str]:
    """``-m torch.distributed.run`` for ``n`` local processes; the standalone rendezvous binds a
    free port itself (a port picked here could be taken by another test before torchrun binds it)."""
    return ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]


def env1() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1"}


def torchrun(n: int, *args, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, *launcher(n), *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env1())


def save_step(path: str, method, net, batch: torch.Tensor, before=None) -> None:
    """One step of ``method`` on ``net`` for the fixed global ``batch``, as one process or as each
    rank under torchrun (``python TEST_FILE DIR``); rank 0 saves the gradients, the BN running
    statistics and the loss terms to ``path``. ``before(model, ctx)`` runs first (a method's
    earlier steps)."""
    from safetensors.torch import save_file

    from advcl_cli.distributed import init_distributed, prepare_model, reduce_mean, shutdown, sync_gradients

    torch.set_num_threads(1)
    ctx = init_distributed(torch.device("cpu"))
    model = prepare_model(net, ctx)
    if before is not None:
        before(model, ctx)
    loss, terms = method.step(model, batch, torch.arange(batch.shape[0]), torch.Generator().manual_seed(6), ctx)
    model.zero_grad()
    loss.backward()
    sync_gradients(model, ctx)
    out = {f"grad.{k}": p.grad for k, p in model.named_parameters()}
    out |= {k: v for k, v in model.state_dict().items() if "running" in k}
    out |= {f"term.{k}": reduce_mean(v, ctx).reshape(1) for k, v in {"loss": loss.detach(), **terms}.items()}
    if ctx.is_main:
        save_file({k: v.detach().contiguous() for k, v in out.items()}, path)
    shutdown(ctx)


def one_and_two_processes(folder: Path, script: str, name: str) -> tuple[dict, dict]:
    """What ``python script DIR`` saved as ``name`` run as one process and under torchrun with two."""
    def run(sub: str, procs: int) -> dict:
        (folder / sub).mkdir()
        launch = [] if procs == 1 else launcher(procs)
        done = subprocess.run([sys.executable, *launch, script, str(folder / sub)], capture_output=True,
                              text=True, timeout=HANG_S, env=env1())
        assert done.returncode == 0, done.stderr[-3000:]
        return load_file(folder / sub / name)

    one, two = run("one", 1), run("two", 2)
    assert one.keys() == two.keys()
    return one, two


def assert_same_step(one: dict, two: dict) -> None:
    for key in sorted(one, key=lambda k: not k.startswith("term.")):  # the terms first, for the message
        torch.testing.assert_close(two[key], one[key], rtol=1e-7, atol=1e-9, msg=key)


def compare(one: dict, two: dict, atol=1e-5):
    assert set(one) == set(two)
    for k in one:
        torch.testing.assert_close(two[k].float(), one[k].float(), atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """dist_worker.py's steps, once in one process and once on 2 processes (torchrun)."""
    from advcl_cli.pseudolabels import save_labels

    root = tmp_path_factory.mktemp("steps")
    g = torch.Generator().manual_seed(0)
    labels = save_labels(root / "labels.safetensors", {k: torch.randint(0, k, (8,), generator=g) for k in (2, 5)},
                         dataset="test", split="train", encoder="test")
    (root / "one").mkdir()
    (root / "two").mkdir()
    single = subprocess.run([sys.executable, WORKER, "steps", str(root / "one"), str(labels)],
                            capture_output=True, text=True, timeout=HANG_S, env=env1())
    assert single.returncode == 0, single.stderr
    dist = torchrun(2, WORKER, "steps", str(root / "two"), str(labels))
    assert dist.returncode == 0, dist.stderr[-3000:]
    return {name: (load_file(root / "one" / name), load_file(root / "two" / name))
            for name in ("primitives.safetensors", "advcl.safetensors", "acl.safetensors")}


def test_global_batch_primitives_match_one_process(steps):
    one, two = steps["primitives.safetensors"]
    compare(one, two)
    # the BN running statistics were updated from the global batch, not one rank's half
    bn = "backbone.bn1.sets.pgd.running_var"
    assert not torch.allclose(one[bn], torch.ones_like(one[bn]))


def test_advcl_step_with_the_attack_on_two_processes_matches_one(steps):
    """One AdvCL step with 5 PGD steps, float64: 2 processes x 4 images == 1 x 8, the weights
    after the SGD step within 1e-8. It needs the attack's all-gather (x_cl ascends the loss of
    the global batch), global-batch BN and the gradient all-reduce."""
    one, two = steps["advcl.safetensors"]
    assert set(one) == set(two) and all(v.dtype == torch.float64 for k, v in one.items() if v.is_floating_point())
    for key in ("__loss__", "__contrast__", "__pseudo_ce__"):
        assert abs(float(one[key]) - float(two[key])) < 1e-10, key
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-8, msg=key)
    start = advcl_net((2, 5)).state_dict()
    moved = max(float((one[k] - start[k]).abs().max()) for k in start if k.endswith("weight"))
    assert moved > 1e-3  # the step did move the weights


def test_acl_step_with_the_attack_on_two_processes_matches_one(steps):
    """One ACL step with 5 PGD steps and LARS, float64: 2 processes x 4 images == 1 x 8. It
    needs the NT-Xent's all-gather in the attack and the loss, global-batch BN over both views
    and the gradient all-reduce."""
    one, two = steps["acl.safetensors"]
    for key in ("__loss__", "__clean__", "__adv__"):
        assert abs(float(one[key]) - float(two[key])) < 1e-10, key
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-8, msg=key)
    start = acl_net().state_dict()
    assert max(float((one[k] - start[k]).abs().max()) for k in start if k.endswith("weight")) > 1e-4


def test_a_killed_rank_ends_the_job_with_an_error(tmp_path):
    out = tmp_path / "pid"
    cmd = [
        sys.executable, *launcher(2),
        WORKER, "collectives", str(out),
    ]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env1())
    try:
        wait_for(lambda: Path(f"{out}.1").exists() and Path(f"{out}.1").read_text() != "", "rank 1 started", job)
        os.kill(int(Path(f"{out}.1").read_text()), signal.SIGKILL)
        code = job.wait(timeout=HANG_S)  # ends instead of hanging in the next collective
    finally:
        if job.poll() is None:
            job.kill()
    assert code != 0
    assert "SIGKILL" in job.stderr.read() or code < 0


def run_pretrain(tmp_path, name, procs, pgd_steps, *extra):
    args = [
        "pretrain", "--dataset", "digits", "--limit", "32", "--arch", "resnet18-tiny", "--epochs", "1",
        "--batch-size", "32", "--pgd-steps", str(pgd_steps), "--lr", "0.1", "--device", "cpu",
        "--pseudo-labels", str(tmp_path / "labels.safetensors"), "--out", str(tmp_path / name), *extra,
    ]
    env = {**env1(), "ADVCL_MIN_LR_RATIO": "1"}  # a constant rate: the one step moves the weights
    if procs == 1:
        cmd = [sys.executable, "-m", "advcl_cli", *args]
    else:
        cmd = [sys.executable, *launcher(procs), "-m", "advcl_cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / name / "metrics.jsonl").read_text())
    return done.stdout, metrics, load_file(tmp_path / name / "encoder.safetensors")


def test_pretrain_step_on_two_processes_matches_one(tmp_path):
    """One AdvCL step (views, attack starts, SupCon over the global batch, global BN,
    pseudo-label CE, SGD) through the real CLI: 2 gloo processes x 16 images == 1 x 32."""
    write_labels(tmp_path)
    _, m1, w1 = run_pretrain(tmp_path, "one", 1, pgd_steps=0)
    out2, m2, w2 = run_pretrain(tmp_path, "two", 2, pgd_steps=0)
    assert out2.strip().splitlines() == [str(tmp_path / "two" / "encoder.safetensors")]  # rank 0 alone prints
    for key in ("loss", "contrast", "pseudo_ce"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
    # The weights after the step agree to a small fraction of the step itself. Not to 1e-6:
    # fp32 sums in another order flip a few ReLU gates whose input is ~0, and the gradient of
    # a small network at batch 32 is sensitive to that (one process with nn.BatchNorm2d versus
    # GlobalBatchNorm's formula differs as much). A missing gradient sync, all-gather or global
    # BN moves the weights by a large part of the step instead.
    step, gap = conv_distance(initial_weights(), w1), conv_distance(w1, w2)
    assert step > 1e-2 and gap / step < 1e-2, (float(gap), float(step))
    # the attack (pgd_steps > 0) on two processes: test_advcl_step_with_the_attack_on_two_processes_matches_one


def test_bf16_pretrain_step_on_two_processes_matches_one(tmp_path):
    """The GPU path (bf16 autocast, channels_last) under torchrun: 2 gloo processes x 16 images
    == 1 x 32 in bf16, within bf16's precision. At initialisation a contrastive gradient is a
    sum of nearly cancelling terms, so bf16 moves one step's weights far from fp32's (measured:
    by 0.56 of the step). The tolerance is that distance: the 2-process bf16 weights must be
    closer to the 1-process bf16 ones than fp32's are (measured 0.35 of the step; without the
    gradient all-reduce 1.57). The loss terms agree within bf16's rounding."""
    write_labels(tmp_path)
    fast = ("--precision", "bf16", "--channels-last", "on")
    _, m1, w1 = run_pretrain(tmp_path, "one", 1, 0, *fast)
    _, m2, w2 = run_pretrain(tmp_path, "two", 2, 0, *fast)
    _, m32, w32 = run_pretrain(tmp_path, "fp32", 1, 0)
    assert m1["loss"] != m32["loss"]  # bf16 ran (it rounds otherwise than fp32)
    for key in ("loss", "contrast", "pseudo_ce"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-2), key
    step, gap, bf16_vs_fp32 = conv_distance(initial_weights(), w1), conv_distance(w1, w2), conv_distance(w1, w32)
    assert step > 1e-2 and gap < bf16_vs_fp32, (float(gap), float(bf16_vs_fp32), float(step))
    runtime = load_checkpoint(tmp_path / "two" / "encoder.safetensors").meta.config["runtime"]
    assert runtime["precision"] == "bf16" and runtime["channels_last"] is True


def write_labels(tmp_path) -> None:
    from advcl_cli.pseudolabels import save_labels

    g = torch.Generator().manual_seed(0)
    save_labels(tmp_path / "labels.safetensors", {k: torch.randint(0, k, (32,), generator=g) for k in (2, 10)},
                dataset="digits", split="train", encoder="test")


def initial_weights() -> dict:
    """The weights run_pretrain's encoder starts from (seed 0)."""
    torch.manual_seed(0)
    return create_model("resnet18-tiny", bn_sets=("normal", "pgd", "pgd_ce"), proj_dim=128, pseudo_ks=(2, 10)).state_dict()


def conv_distance(a: dict, b: dict) -> torch.Tensor:
    """The distance between two sets of weights over the convolutions."""
    keys = [k for k in a if k.endswith("weight") and "conv" in k]
    return torch.cat([(b[k] - a[k]).flatten() for k in keys]).norm()


def test_aff_on_two_processes_trains_batch_norm(tmp_path):
    """AFF trains the whole network under torchrun, the BN parameters included (the BN modules
    are swapped for global-batch ones before the optimizer is built)."""
    from advcl_cli.checkpoint import save_model

    torch.manual_seed(0)
    enc = create_model("resnet18-tiny", bn_sets=("normal", "pgd", "pgd_ce"), proj_dim=128)
    save_model(tmp_path / "enc.safetensors", enc, kind="encoder", method="advcl", dataset="digits", eps=8 / 255)
    cmd = [sys.executable, *launcher(2), "-m", "advcl_cli", "finetune", str(tmp_path / "enc.safetensors"),
           "--scheme", "aff", "--epochs", "1", "--limit", "32", "--batch-size", "16", "--attack-steps", "1",
           "--eval-limit", "8", "--device", "cpu", "--out", str(tmp_path / "aff")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, env=env1())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines() == [str(tmp_path / "aff" / "classifier.safetensors")]
    clf = load_file(tmp_path / "aff" / "classifier.safetensors")
    before = enc.state_dict()
    for name in ("bn1", "layers.0.0.bn1", "layers.3.1.bn2"):
        for p in ("weight", "bias"):
            key = f"backbone.{name}.sets.pgd.{p}"
            assert not torch.equal(clf[key], before[key]), key
