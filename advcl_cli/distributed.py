"""Distributed training through torchrun, with single-process fallbacks.

Engines call these functions unconditionally; with one process they are identities, so the
CPU tests walk the same code as a multi-GPU job. The semantics are those of one device with
the global batch:

- every rank iterates over the same global batches and draws the same random numbers for the
  whole of each (augmentations, attack starts), then keeps its slice (``local_slice``), so a
  step matches a single process exactly (augmenting the global batch on every rank costs
  little beside the attack);
- the contrastive loss sees every rank's projections (``all_gather_with_grad``: gradients flow
  back to the rank that produced each row);
- BatchNorm normalises with statistics of the global batch (``prepare_model`` swaps every BN
  for ``GlobalBatchNorm``, which all-reduces sums and squares with autograd);
- after backward, gradients are averaged with one all-reduce over a flat buffer
  (``sync_gradients``). That plays DDP's part without its wrapper: the AdvCL step runs many
  forwards through three BN sets and input-only gradient passes for PGD before the one weight
  backward, which DDP's reducer is not built for. NCCL on CUDA, gloo on CPU.

Evaluation is sharded instead: each rank attacks a contiguous part of the test images and the
per-image results are gathered in the original order (``gather_shards``); see
``engine.evaluate``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import AdvclError, UsageError
from .device import upcast


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owner: bool = field(default=True, compare=False)  # this context joined the group: ``shutdown`` leaves it
    host_group: object = field(default=None, compare=False)  # a gloo group beside NCCL, for ``agree_max``

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group.

    A single process gets the trivial context. On CUDA each process uses GPU ``LOCAL_RANK``
    (``torch.device("cuda")`` then means that GPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible",
                "set --nproc-per-node to the number of GPUs",
            )
        torch.cuda.set_device(local)
    owner = not dist.is_initialized()  # else a caller (the benchmark) joined it and leaves it
    if owner:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=int(os.environ.get("ADVCL_DIST_TIMEOUT", "600")))
        # the keys of this attempt only: torchrun's agent keeps one store across --max-restarts,
        # where a restarted rank could read a dead one's address (and wait for it until the timeout)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"advcl/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    host = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None  # every rank makes it, in step
    return DistContext(rank=rank, world_size=world, local_rank=local, owner=owner, host_group=host)


def local_slice(x: torch.Tensor, ctx: DistContext, dim: int = 0) -> torch.Tensor:
    """This rank's contiguous share of a global-batch tensor (along ``dim``)."""
    if not ctx.enabled:
        return x
    n = x.shape[dim] // ctx.world_size
    return x.narrow(dim, ctx.rank * n, n)


def on_main(fn, ctx: DistContext):
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its error.

    The other ranks wait for rank 0, so a refused run folder (say) stops the whole job with
    rank 0's message instead of leaving the other ranks waiting in a collective.
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except AdvclError as e:
            error = e
        except Exception as e:  # any failure on rank 0 must reach the other ranks too
            if not ctx.enabled:
                raise
            error = AdvclError(f"{type(e).__name__}: {e}")
    if ctx.enabled:
        box = [None if error is None else (type(error).__name__, error.message, error.hint, error.exit_code)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            _, message, hint, code = box[0]
            error = AdvclError(f"rank 0 stopped: {message}", hint)
            error.exit_code = code
    if error is not None:
        raise error
    return result


class _GatherCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's rows
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_gather_with_grad(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), keeping gradients."""
    return _GatherCat.apply(x) if ctx.enabled else x


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d or 2d) whose training statistics cover every rank's batch.

    Sums and sums of squares are all-reduced with autograd, so gradients match one process
    holding the global batch. Same parameters and buffers as nn.BatchNorm*, so checkpoints
    do not change. Outside training, or with one process, it is a plain BatchNorm.
    """

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] if x.dim() == 2 else [0, 2, 3]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = upcast(x)  # float64 stays float64
        count = torch.full((1,), x.numel() / x.shape[1], device=x.device, dtype=xf.dtype)
        # two passes (mean, then centred squares), as a single device would compute them:
        # E[x^2] - E[x]^2 loses precision when a channel's mean is large beside its spread
        first = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n = first[-1]
        mean = first[:-1] / n
        var = _AllReduceSum.apply(((xf - mean.view(shape)) ** 2).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def _convert_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        like = module.weight if module.affine else module.running_mean  # device and float dtype to keep
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=like.device, dtype=like.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert_bn(child))
    return module


def prepare_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Make ``model`` ready for data parallelism: global BN and rank 0's initial weights."""
    if not ctx.enabled:
        return model
    model = _convert_bn(model)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t, src=0)
    return model


def sync_gradients(model: nn.Module, ctx: DistContext) -> None:
    """Average parameter gradients over ranks with one all-reduce of a flat buffer."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_mean(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a tensor over ranks (for metrics)."""
    if not ctx.enabled:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / ctx.world_size


def gather_shards(x: torch.Tensor, sizes: list[int], ctx: DistContext) -> torch.Tensor:
    """Every rank's ``x`` (``sizes[r]`` rows on rank r) concatenated along dim 0 in rank order, on
    every rank: contiguous shards come back in their original order."""
    if not ctx.enabled:
        return x
    flag = x.dtype == torch.bool  # gloo cannot gather bools
    buf = x.new_zeros((max(sizes), *x.shape[1:]), dtype=torch.uint8 if flag else x.dtype)
    buf[: x.shape[0]] = x
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    out = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return out.bool() if flag else out


def all_gather_rows(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's ``x`` (same shape everywhere) stacked in rank order, on every rank: (ranks, *x.shape)."""
    if not ctx.enabled:
        return x.unsqueeze(0)
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts)


def sum_over_ranks(n: int, ctx: DistContext, device: torch.device) -> int:
    """``n`` summed over ranks (a count of work done, for rank 0's progress display)."""
    if not ctx.enabled:
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


def broadcast_from_main(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Rank 0's ``x`` on every rank (the others pass a tensor of the same shape and dtype)."""
    if ctx.enabled:
        dist.broadcast(x, src=0)
    return x


def agree_max(value: int, ctx: DistContext) -> int:
    """The largest ``value`` over the ranks, agreed on the host (through gloo, beside NCCL on
    GPUs), so asking costs no device sync; with one process, ``value``."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.host_group)
    return int(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Tear down the process group, if ``ctx`` joined it (an engine called by another engine
    that holds the group, as the benchmark calls finetuning, leaves it to its caller), once
    every rank has got here.

    Call it on every rank at the same point (after the last collective). The barrier keeps a
    rank from shutting its gloo connections down while another is still finishing the last
    collective on them, which could end a rank with SIGABRT at exit ("terminate called without
    an active exception")."""
    if ctx.enabled and ctx.owner and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = [
    "DistContext",
    "GlobalBatchNorm",
    "agree_max",
    "all_gather_rows",
    "all_gather_with_grad",
    "barrier",
    "broadcast_from_main",
    "gather_shards",
    "init_distributed",
    "local_slice",
    "on_main",
    "prepare_model",
    "reduce_mean",
    "shutdown",
    "sum_over_ranks",
    "sync_gradients",
]
