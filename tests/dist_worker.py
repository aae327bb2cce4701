"""Run by tests/test_distributed.py, as one plain process or as each rank under torchrun.

``python dist_worker.py primitives OUT`` takes one SGD step of a tiny contrastive model on a
fixed global batch through the engine's distributed functions, and rank 0 writes the loss and
the weights to OUT, so a test can compare 1 process x B with 2 processes x B/2.
"""

import sys

import torch
from safetensors.torch import save_file

from advcl_cli.engine.distributed import (
    all_gather_with_grad,
    init_distributed,
    local_slice,
    prepare_model,
    reduce_mean,
    shutdown,
    sync_gradients,
)
from advcl_cli.models import create_model


def primitives(out: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed(torch.device("cpu"))
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
    shutdown(ctx)


def collectives(out: str) -> None:
    """Write this rank's pid to OUT.<rank>, then keep all-reducing for at most two minutes."""
    import os
    import time

    ctx = init_distributed(torch.device("cpu"))
    with open(f"{out}.{ctx.rank}", "w") as f:
        f.write(str(os.getpid()))
    deadline = time.time() + 120
    while time.time() < deadline:
        reduce_mean(torch.ones(4), ctx)
        time.sleep(0.05)
    shutdown(ctx)


if __name__ == "__main__":
    {"primitives": primitives, "collectives": collectives}[sys.argv[1]](*sys.argv[2:])
