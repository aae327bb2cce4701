"""--compile walked on the CPU: inductor compiles with the machine's C compiler, so the compiled
step and evaluation run here as on a GPU. TorchDynamo's counters say whether a graph was
compiled, so a switch that is silently ignored fails the test. A compiled step computes in fp32
as the eager one but fuses operations (another summation order): 1e-3 relative.

These tests take about a minute each on 2 cores (marker ``compile``; the suite runs them, CI too:
``pytest -m "not compile"`` leaves them out while iterating)."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from advcl_cli.checkpoint import load_checkpoint, load_state
from advcl_cli.data.registry import load_dataset
from advcl_cli.engine.evaluate import evaluate
from advcl_cli.engine.pretrain import pretrain
from test_gpu_path import classifier, pretrain_settings, teacher  # noqa: F401, F811 (fixtures)
from training import InterruptAt

pytestmark = pytest.mark.compile

def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_pretraining_equals_eager_and_resumes(teacher, tmp_path, monkeypatch):
    """SimCLR, 2 epochs of 1 step: compiled == eager; the state holds the eager names, and an
    interrupted compiled run resumes (compiled again) to the same weights."""
    torch._dynamo.reset()
    counters.clear()
    eager = pretrain(pretrain_settings("simclr", teacher, out="eager", epochs=2))
    assert compiled_graphs() == 0
    comp = pretrain(pretrain_settings("simclr", teacher, out="comp", epochs=2, compile=True))
    assert compiled_graphs() > 0, "--compile compiled nothing"
    assert comp.metrics["loss"] == pytest.approx(eager.metrics["loss"], rel=1e-3)
    assert comp.runtime["compile"] is True
    a, b = load_checkpoint(eager.path).tensors, load_checkpoint(comp.path).tensors
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)

    # interrupted after epoch 1, then resumed with --compile: no "_orig_mod" in the state
    with pytest.raises(KeyboardInterrupt):
        pretrain(pretrain_settings("simclr", teacher, out="again", epochs=2, compile=True), InterruptAt(2))
    state = load_state(tmp_path / "again" / "state.safetensors")
    assert state["epoch"] == 1
    assert not [k for k in state["model"] if "_orig_mod" in k]
    resumed = pretrain(pretrain_settings("simclr", teacher, out="again", epochs=2, compile=True), resume=True)
    c = load_checkpoint(resumed.path).tensors
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_compiled_evaluation_equals_eager(classifier):
    data = load_dataset("digits", "test", limit=16, image_size=16)
    torch._dynamo.reset()
    counters.clear()
    eager = evaluate(classifier, data, ["pgd20"], [8 / 255], batch_size=16, device="cpu")
    assert compiled_graphs() == 0
    comp = evaluate(copy.deepcopy(classifier), data, ["pgd20"], [8 / 255], batch_size=16, device="cpu", compile=True)
    assert compiled_graphs() > 0, "compile=True compiled nothing"
    assert comp["clean_acc"] == eager["clean_acc"]
    assert abs(comp["robust"][0]["robust_acc"] - eager["robust"][0]["robust_acc"]) <= 1 / 16
    assert comp["runtime"]["compile"] is True
