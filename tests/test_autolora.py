"""AutoLoRa (--scheme autolora): one step against an independent float64 copy of the authors'
``trades_loss_autolora`` on a LoRA-wrapped copy of the network (tests/reference/autolora.py),
the automatic learning rate against the authors' loop, the loss weights, and a run through the
CLI on digits."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from advcl_cli.config import resolve
from advcl_cli.engine import autolora
from advcl_cli.engine.finetune import SCHEMES
from advcl_cli.models import IMAGENET_MEAN, IMAGENET_STD, create_model
from advcl_cli.settings import BenchmarkSettings, FinetuneSettings
from nets import randomise_batch_norms
from reference import autolora as reference

B, SIZE, STEPS = 8, 16, 3
L1, L2 = 0.3, 4.2  # the loss weights of the step: a swap of l1 and 1 - l1, or a KL weight off, shows


def classifier():
    torch.manual_seed(0)
    net = create_model("resnet18-tiny", bn_sets=("pgd",), num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return randomise_batch_norms(net, 1).double().train()


def test_one_step_equals_the_authors_in_float64():
    settings = resolve(FinetuneSettings, {"scheme": "autolora", "attack_steps": STEPS})
    net = classifier()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(B, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (B,), generator=g)

    scheme = SCHEMES["autolora"](settings)
    ours = scheme.prepare(copy.deepcopy(net)).double()
    with torch.no_grad():  # B non-zero, so the branch changes the natural route from the first step
        for b in ours.lora.b:
            b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64))
    a_list, b_list = [a.detach().clone() for a in ours.lora.a], [b.detach().clone() for b in ours.lora.b]
    assert len(a_list) == len([m for m in net.backbone.layers.modules() if isinstance(m, nn.Conv2d)])
    assert a_list[0].shape == (8 * 3, 8 * 3) and b_list[0].shape == (8 * 3, 8 * 3)  # 8 channels, k 3, rank 8
    scheme.run = SimpleNamespace(l1=L1, l2=L2)
    loss, _ = scheme.loss(ours, x, y, torch.Generator().manual_seed(9), "fp32", torch.device("cpu"))
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    opt.zero_grad()
    loss.backward()
    opt.step()

    theirs = reference.with_lora(net, a_list, b_list)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ref = reference.trades_loss_autolora(theirs, x, y, noise, perturb_steps=STEPS, LAMBDA1=L1, LAMBDA2=L2)
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    ref_opt.zero_grad()
    ref.backward()
    ref_opt.step()

    assert torch.allclose(loss, ref, rtol=1e-12)
    convs = [n for n, m in theirs.named_modules() if isinstance(m, reference.ConvLoRA)]
    expected = {}
    for k, v in theirs.state_dict().items():  # their names -> ours
        owner, _, leaf = k.rpartition(".")
        if owner in convs:
            k = f"lora.{'a' if leaf == 'lora_A_nat' else 'b'}.{convs.index(owner)}"
        expected[k.replace(".conv.weight", ".weight")] = v
    got = ours.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-13, msg=k)
    moved = [k for k in expected if "running" not in k and not torch.equal(net.state_dict().get(k, got[k] * 0), got[k])]
    assert any(k.startswith("lora.a") for k in moved) and any("layers" in k for k in moved) and "fc.weight" in moved


def authors_autolr(accs):
    """The authors' automatic learning rate (utils.train, --autoLR 1, mode AFF), fed ``accs``."""
    W = torch.LongTensor([0, 16, 24, 28, 36, 40, 42, 44, 46, 48, 50])
    w_index, eta, rho, max_acc, divide = 1, 0.1, 0.75, -1, 2
    eta_list = torch.Tensor([0] * len(W))
    eta_list[0] = eta
    loss_list = torch.zeros(size=(1, len(accs) + 1)).squeeze()
    loss_min_list = torch.Tensor([0] * len(W))
    lrs, reloads = [], []
    for epoch in range(1, len(accs) + 1):
        va_adv_acc, reload = accs[epoch - 1], False
        loss_list[epoch - 1] = va_adv_acc
        if va_adv_acc > max_acc:
            loss_min_list[w_index] = va_adv_acc
            max_acc = va_adv_acc
        if epoch - 1 == W[w_index]:
            w_j_0, w_j_1 = W[w_index - 1].item(), W[w_index].item()
            count = sum(1 for j in range(w_j_0, w_j_1) if loss_list[j + 1] > loss_list[j])
            if count < rho * (w_j_1 - w_j_0):
                eta /= divide
                eta_list[w_index] = eta
                reload = True
            elif eta_list[w_index] == eta_list[w_index - 1] and loss_min_list[w_index] == loss_min_list[w_index - 1]:
                eta /= divide
                eta_list[w_index] = eta
                reload = True
            if w_index < len(W) - 1:
                w_index += 1
                loss_min_list[w_index] = loss_min_list[w_index - 1]
                eta_list[w_index] = eta_list[w_index - 1]
        lrs.append(eta)
        reloads.append(reload)
    return lrs, reloads


def test_the_learning_rate_follows_the_authors_rule():
    g = torch.Generator().manual_seed(0)
    noisy = [round(40 + 10 * float(v), 2) for v in torch.rand(17, generator=g)]  # few rises: halve at 17
    rising = [51.0 + i for i in range(8)]  # 18-25: rises, a new best: keep
    flat = [50.0] * 4  # 26-29: no rise: halve
    below = [40.0 + i for i in range(8)]  # 30-37: rises, no new best, the rate unchanged in the window: halve
    tail = [round(45 + 5 * float(v), 2) for v in torch.rand(13, generator=g)]
    accs = noisy + rising + flat + below + tail
    lr = autolora.AutoLR(50)
    ours = [(lr.update(e, a)[1], lr.eta) for e, a in enumerate(accs, 1)]
    lrs, reloads = authors_autolr(accs)
    assert [r for r, _ in ours] == reloads and [e for _, e in ours] == lrs
    assert reloads[16] and not reloads[24] and reloads[28] and reloads[36]  # each rule fires where it should


def test_the_loss_weights_come_from_the_clean_accuracy_of_the_training_split():
    settings = resolve(FinetuneSettings, {"scheme": "autolora", "batch_size": 4, "epochs": 2})
    net = classifier().float().eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        labels = net(images.float() / 255).argmax(1)  # about right on the un-augmented images
    labels[:2] = (labels[:2] + 1) % 10
    run = autolora.AutoLoRaRun(settings, images, labels, steps=3)
    run.start_epoch(0, net, "fp32", torch.device("cpu"))
    assert run.every == 1 and net.training  # measured again after every step of a 3-step epoch; back in train mode
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003)
    acc = autolora.natural_accuracy(net, images, labels, 4, gen, "fp32", torch.device("cpu"))
    assert 0 < acc < 1 and acc != 0.5 and run.l1 == 1 - acc and abs(run.l2 - 6 * acc) < 1e-12


def test_autolora_runs_offline_through_finetune_and_eval(run_cli, tmp_path):
    small = ["--dataset", "digits", "--limit", "32", "--image-size", "16", "--device", "cpu"]
    code, enc, err = run_cli("pretrain", "--method", "acl", *small, "--arch", "resnet18-tiny", "--epochs", "1",
                             "--batch-size", "16", "--pgd-steps", "1", "--out", tmp_path / "acl")
    assert code == 0, err
    code, clf, err = run_cli("finetune", enc.strip(), "--scheme", "autolora", "--epochs", "2", "--batch-size", "16",
                             "--attack-steps", "1", "--eval-limit", "8", *small, "--out", tmp_path / "ft")
    assert code == 0, err
    from advcl_cli.checkpoint import load_checkpoint, load_state

    ckpt = load_checkpoint(clf.strip())
    assert ckpt.meta.kind == "classifier" and ckpt.meta.model["bn_sets"] == ["pgd"]
    assert not any("lora" in k for k in ckpt.build("cpu").state_dict())  # the branch is not kept
    state = load_state(tmp_path / "ft" / "state.safetensors")
    assert any("lora" in k for k in state["model"]) and len(state["extra"]["scheme"]["schedule"]["accs"]) == 3
    assert len((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()) == 2
    code, out, err = run_cli("eval", clf.strip(), "--attack", "pgd3", "--limit", "8", "--image-size", "16", "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == 8
    assert resolve(BenchmarkSettings, {"schemes": "slf,autolora"}).schemes == ["slf", "autolora"]


def test_a_run_stopped_after_an_epoch_and_resumed_equals_the_uninterrupted_one(tmp_path):
    """The scheme's own state (the clean accuracies that drive the automatic rate, the loss
    weights, the best epoch's weights) and the LoRA branch resume with the run, bit for bit."""
    from advcl_cli.checkpoint import load_checkpoint, load_state
    from advcl_cli.engine.finetune import finetune
    from advcl_cli.report import Reporter
    from test_finetune import SMALL, make_encoder
    from training import InterruptAt

    encoder = load_checkpoint(make_encoder(tmp_path / "enc.safetensors"))

    def settings(out):
        return resolve(FinetuneSettings, dict(out=tmp_path / out, **{**SMALL, "scheme": "autolora", "epochs": 2}))

    full = finetune(settings("full"), encoder, Reporter())
    with pytest.raises(KeyboardInterrupt):
        finetune(settings("cut"), encoder, InterruptAt(3))  # 2 steps per epoch: the first step of epoch 2
    assert load_state(tmp_path / "cut" / "state.safetensors")["epoch"] == 1
    resumed = finetune(settings("cut"), encoder, Reporter(), resume=True)
    a, b = load_checkpoint(full.path).tensors, load_checkpoint(resumed.path).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_state(tmp_path / "full" / "state.safetensors"), load_state(tmp_path / "cut" / "state.safetensors")
    assert any("lora" in k for k in sa["model"]) and all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert same(sa["extra"]["scheme"], sb["extra"]["scheme"]) and len(sa["extra"]["scheme"]["schedule"]["accs"]) == 3


def same(a, b) -> bool:
    """Equal nested dicts / lists of tensors (bit for bit) and plain values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b
