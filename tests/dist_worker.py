"""Run by tests/test_distributed.py, as one plain process or as each rank under torchrun.

``python dist_worker.py steps DIR LABELS`` takes two steps on fixed global batches, and rank 0
writes what they give to DIR, so a test can compare 1 process x B with 2 processes x B/2:

- ``primitives.safetensors``: one SGD step of a tiny contrastive model through the engine's
  distributed functions (all-gather with gradients, global-batch BN, gradient all-reduce);
- ``acl.safetensors``: one production ACL step (5 PGD steps in eval mode, both NT-Xents) in
  float64 on a tiny ACL-family network whose BN sets differ, then one LARS step;
- ``advcl.safetensors``: one production AdvCL step (views, 5 PGD steps on x_cl and x_ce with
  pseudo labels from LABELS, the loss) in float64 on a tiny network whose BN sets differ, then
  one SGD step (lr 0.5, momentum 0.9, weight decay 1e-4).

``python dist_worker.py dynacl DIR`` writes ``dynacl.safetensors``: one DynACL step with its
momentum encoder, likewise.
"""

import sys

import torch
from safetensors.torch import save_file

from advcl_cli.distributed import (
    all_gather_with_grad,
    init_distributed,
    local_slice,
    prepare_model,
    reduce_mean,
    shutdown,
    sync_gradients,
)
from advcl_cli.models import create_model


ADVCL_BATCH = 8


def primitives(out: str, ctx) -> None:
    torch.manual_seed(0)
    model = prepare_model(create_model("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=16), ctx)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x = local_slice(x, ctx)
    z = all_gather_with_grad(model.project(model.features(x, "pgd")), ctx)
    sim = z @ z.T / 0.5 - 1e9 * torch.eye(len(z))
    loss = torch.logsumexp(sim, dim=1).mean()  # every row sees every rank's rows
    loss = loss + 0.1 * model.features(x, "normal").pow(2).mean()  # a per-rank mean term
    opt.zero_grad()
    loss.backward()
    sync_gradients(model, ctx)
    opt.step()
    loss = reduce_mean(loss.detach(), ctx)
    if ctx.is_main:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file({**state, "__loss__": loss.reshape(1)}, out)


def update_and_save(model, opt, loss, terms, out: str, ctx, extra=None) -> None:
    """Backward, the gradient all-reduce, one optimizer step; rank 0 writes the weights, ``extra``
    tensors and the loss terms (averaged over ranks)."""
    opt.zero_grad()
    loss.backward()
    sync_gradients(model, ctx)
    opt.step()
    terms = {f"__{k}__": reduce_mean(v, ctx).reshape(1) for k, v in {"loss": loss.detach(), **terms}.items()}
    if ctx.is_main:
        save_file({**{k: v.detach().contiguous() for k, v in model.state_dict().items()}, **(extra or {}), **terms}, out)


def advcl_step(out: str, labels: str, ctx) -> None:
    from advcl_cli.settings.layering import resolve
    from advcl_cli.engine.pretrain import make_method
    from advcl_cli.pseudolabels import load_labels
    from advcl_cli.settings import PretrainSettings
    from nets import advcl_net

    method = make_method(resolve(PretrainSettings, {"arch": "resnet18-tiny", "pseudo_labels": labels, "pgd_steps": 5}), ADVCL_BATCH)
    model = prepare_model(advcl_net(load_labels(labels).ks, torch.float64), ctx)
    images = torch.randint(0, 256, (ADVCL_BATCH, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    loss, terms = method.step(model, images, torch.arange(ADVCL_BATCH), torch.Generator().manual_seed(3), ctx)
    update_and_save(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4), loss, terms, out, ctx)


def acl_step(out: str, ctx) -> None:
    """One production ACL step (views, the attack in eval mode, both NT-Xents) in float64, then
    one LARS step."""
    from advcl_cli.settings.layering import resolve
    from advcl_cli.engine.pretrain import make_method
    from advcl_cli.settings import PretrainSettings
    from nets import acl_net

    method = make_method(resolve(PretrainSettings, {"method": "acl", "arch": "resnet18-tiny"}), ADVCL_BATCH)
    model = prepare_model(acl_net(torch.float64), ctx)
    images = torch.randint(0, 256, (ADVCL_BATCH, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    loss, terms = method.step(model, images, torch.arange(ADVCL_BATCH), torch.Generator().manual_seed(5), ctx)
    update_and_save(model, method.optimizer(model.parameters()), loss, terms, out, ctx)


def dynacl(folder: str) -> None:
    """One production DynACL step with its momentum encoder (float64, 5 PGD steps, epoch 150
    of 1000), then one SGD step; rank 0 writes the network, the momentum encoder
    (``momentum_encoder.*``: parameters and BN statistics) and the loss terms."""
    from advcl_cli.settings.layering import resolve
    from advcl_cli.engine.pretrain import make_method
    from advcl_cli.settings import PretrainSettings
    from nets import acl_family_net

    torch.set_num_threads(1)
    ctx = init_distributed(torch.device("cpu"))
    method = make_method(resolve(PretrainSettings, {"method": "dynacl", "arch": "resnet18-tiny"}), ADVCL_BATCH)
    model = prepare_model(acl_family_net(method), ctx)
    method.start_epoch(149)
    images = torch.randint(0, 256, (ADVCL_BATCH, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    loss, terms = method.step(model, images, torch.arange(ADVCL_BATCH), torch.Generator().manual_seed(3), ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    update_and_save(model, opt, loss, terms, f"{folder}/dynacl.safetensors", ctx, extra=method.state())
    assert all(p.grad is None and not p.requires_grad for p in method.momentum_net.parameters())
    shutdown(ctx)


def steps(folder: str, labels: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed(torch.device("cpu"))
    primitives(f"{folder}/primitives.safetensors", ctx)
    advcl_step(f"{folder}/advcl.safetensors", labels, ctx)
    acl_step(f"{folder}/acl.safetensors", ctx)
    shutdown(ctx)


def collectives(out: str) -> None:
    """Write this rank's pid to OUT.<rank>, then keep all-reducing until killed (HANG_S: a guard)."""
    import os
    import time

    from waiting import HANG_S

    ctx = init_distributed(torch.device("cpu"))
    with open(f"{out}.{ctx.rank}", "w") as f:
        f.write(str(os.getpid()))
    deadline = time.time() + HANG_S
    while time.time() < deadline:
        reduce_mean(torch.ones(4), ctx)
        time.sleep(0.05)
    shutdown(ctx)


if __name__ == "__main__":
    {"steps": steps, "collectives": collectives, "dynacl": dynacl}[sys.argv[1]](*sys.argv[2:])
