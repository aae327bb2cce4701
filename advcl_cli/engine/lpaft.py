"""DynACL++'s post-processing, LPAFT: linear probing, then adversarial full finetuning, on
pseudo labels. A pretrained encoder in, an encoder out, which ``advcl finetune`` then takes
with any scheme.

Matched to the authors' ``assign_label.py`` and ``LPAFT.py`` (PKU-ML/DYNACL; ``LPAFT_AFF.py``
with ``dual_bn``), with the defaults of ``settings.LpaftSettings``:

1. pseudo labels: the backbone features (before the projection head) of the un-augmented
   training split, through the encoder's "normal" BN set in eval mode, clustered by k-means
   (``clusters`` = 10) on the raw features (euclidean, not normalised). They are written to
   ``pseudo-labels.safetensors`` in the run folder and kept in the resume state;
2. the network: the encoder's "pgd" BN set (``bn_set``) as a single-BN network with the input
   normalisation and a new linear head of ``clusters`` outputs, zero-initialised (weight and
   bias); the projection head is dropped. With ``dual_bn`` the "normal" set stays beside it,
   never used, so unchanged;
3. linear probing, ``probe_epochs`` (10): the encoder frozen in eval mode (its BN statistics do
   not move), cross-entropy of the head on RandomCrop(padding 4) + flip views; SGD over the head
   at ``probe_lr`` 0.01 (constant), momentum 0.9, weight decay 1e-4;
4. TRADES, ``epochs`` (25): a new SGD over every parameter, lr 0.1, momentum 0.9, weight decay
   1e-4, x0.1 at TRADES epochs 10 and 20; the attack (model in eval mode) starts at x itself, no
   random noise, and takes 10 signed steps of 2/255 within 8/255 ascending
   KL_sum(softmax(f(x)) || softmax(f(x_adv))); the loss, in train mode (clean pass, then
   adversarial pass, each normalised with its own batch statistics), is
   CE(f(x), y) + 6 KL_sum / B; every pass through the kept set;
5. batch 512 in both phases, reshuffled every epoch, the last partial batch dropped (the
   authors' ``drop_last=True``).

The result (``encoder.safetensors``) is the backbone with the kept BN set(s) and the input
normalisation, kind "encoder", method the parent's plus "++" (``dynacl++``, ``dynacl-air++``),
whose finetuning protocol is DynACL's. The run folder works as pretraining's and finetuning's
(``engine.run``): ``state.safetensors`` after every epoch of either phase, ``metrics.jsonl``
(with each epoch's ``phase``), ``--resume``. The authors' script also trains throw-away heads
on the true labels to monitor the run (and uses the test split for it); that is left out, as it
changes nothing.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, save_model, unwrap
from ..data.batches import Batches
from ..errors import DataError, UsageError
from ..models import backbone_with_bn_set
from ..optim import MultiStep
from ..pseudolabels import extract_features, kmeans_labels, save_labels
from ..distributed import broadcast_from_main, on_main, prepare_model, shutdown
from .finetune import head_loss, supervised_step, trades_step
from .loop import Loop
from ..report import Reporter, plural
from .run import RunDir, RunResult, begin_derived_run, begin_run, holds_run_folder, load_split, restore

ENCODER_FILE = "encoder.safetensors"
LABELS_FILE = "pseudo-labels.safetensors"
DYNACL_FAMILY = ("dynacl", "dynacl-air")


def output_method(parent: Checkpoint) -> str:
    """``dynacl`` -> ``dynacl++``: the method recorded in the result."""
    method = parent.meta.method
    return method if method.endswith("++") else f"{method}++"


def default_run_dir(settings, parent: Checkpoint) -> Path:
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.dataset or parent.meta.dataset).strip("_")
    return Path("runs") / f"{output_method(parent)}-{dataset}-{parent.sha256[:8]}"


def bn_routes(sets: tuple[str, ...], settings) -> tuple[str, tuple[str, ...], str]:
    """(the BN set trained, the sets kept, the set the features for k-means go through)."""
    keep = settings.bn_set or ("pgd" if "pgd" in sets else sets[0])
    if keep not in sets:
        raise UsageError(f"the encoder has no batch-norm set '{keep}'", f"its sets are: {', '.join(sets)}")
    cluster = "normal" if "normal" in sets else keep
    if not settings.dual_bn:
        return keep, (keep,), cluster
    if "normal" not in sets or keep == "normal":
        raise UsageError(f"--dual-bn keeps the 'normal' set beside '{keep}', and this encoder's sets are "
                         f"{', '.join(sets)}", "drop --dual-bn")
    return keep, ("normal", keep), cluster


def build_network(encoder, sets: tuple[str, ...], classes: int):
    """The encoder's backbone with BN ``sets`` and its normalisation, and a zero linear head."""
    net = backbone_with_bn_set(encoder, sets, num_classes=classes)
    torch.nn.init.zeros_(net.fc.weight)
    torch.nn.init.zeros_(net.fc.bias)
    return net


def cluster_labels(encoder, images: torch.Tensor, settings, bn: str) -> torch.Tensor:
    """k-means labels (N,) of the raw backbone features of ``images`` (un-augmented) through
    ``bn``, in eval mode."""
    feats = extract_features(encoder, images, batch_size=settings.batch_size, bn=bn)
    return kmeans_labels(feats, settings.clusters, seed=settings.seed, normalize=False)


def optimizers(model, settings) -> tuple[torch.optim.SGD, torch.optim.SGD]:
    """The probe's SGD over the head and TRADES' SGD over every parameter (both made at the
    start, as the authors' are; the second is first used when the probe is over)."""
    probe = torch.optim.SGD(unwrap(model).fc.parameters(), lr=settings.probe_lr, momentum=settings.momentum,
                            weight_decay=settings.weight_decay)
    full = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)
    return probe, full


class Steps:
    """The losses of one (local) batch in each phase, through BN set ``bn``."""

    def __init__(self, settings, bn: str):
        self.s, self.bn = settings, bn

    def probe(self, model, x, y, gen, precision, device):
        """Linear probing: the head's cross-entropy on the frozen encoder (eval mode)."""
        return head_loss(model, x, y, precision, device, bn=self.bn)

    def trades(self, model, x, y, gen, precision, device):
        """TRADES on the pseudo labels, the attack starting at x (no random noise)."""
        return trades_step(model, x, y, gen, precision, device, self.s, clean_bn=self.bn, adv_bn=self.bn,
                           random_start=False)


@holds_run_folder
def lpaft(settings, parent: Checkpoint, reporter: Reporter | None = None, *, resume: bool = False,
          force: bool = False) -> RunResult:
    """DynACL++'s post-processing of the encoder ``parent``; returns the new encoder's path."""
    reporter = reporter or Reporter()
    if parent.meta.kind != "encoder":
        raise UsageError(f"{parent.path} is a {parent.meta.kind} checkpoint; lpaft post-processes a pretrained encoder",
                         "pass the encoder from advcl pretrain --method dynacl")
    dataset = settings.dataset or parent.meta.dataset
    encoder = parent.build("cpu")
    bn, keep, cluster_bn = bn_routes(encoder.config.bn_sets, settings)
    run = RunDir(settings.out or default_run_dir(settings, parent), artifacts=(ENCODER_FILE, LABELS_FILE), verb="lpaft")
    runtime, ctx, config, state, reporter = begin_derived_run(
        settings, run, parent, dataset, "post-processes", reporter, resume=resume, force=force, may_change=settings.resume_may_change())
    device, precision = runtime.device, runtime.precision
    if state is not None and state.get("finished"):
        reporter.log(f"{run.path} already finished all {state['epoch']} epochs")
        shutdown(ctx)
        return RunResult(run.artifact(ENCODER_FILE), run.path, int(state["epoch"]), (run.read_metrics() or [{}])[-1],
                         ctx.is_main, runtime=state["extra"].get("runtime", {}))
    if parent.meta.method not in DYNACL_FAMILY:
        reporter.warn(f"lpaft is DynACL++'s post-processing; this encoder was pretrained with '{parent.meta.method}'")

    data = load_split(dataset, "train", ctx, data_dir=settings.data_dir, download=settings.download,
                      limit=settings.limit, image_size=settings.image_size).to(device)
    if settings.clusters > len(data):
        raise DataError(f"cannot make {settings.clusters} clusters from {len(data)} images", "use fewer --clusters")
    Batches(data, settings.batch_size, drop_last=True)  # a batch larger than the data is refused before k-means
    begin_run(run, ctx, state)  # every check passed: the folder is created (or cleared) now
    if state is not None:
        labels = state["extra"]["labels"].to(device)
    else:
        def make_labels():
            reporter.log(f"k-means ({settings.clusters} clusters) on the features of {len(data)} {data.name} images "
                         f"through '{cluster_bn}'")
            found = cluster_labels(encoder.to(device), data.images, settings, cluster_bn)
            save_labels(run.artifact(LABELS_FILE), {settings.clusters: found}, dataset=data.name, split="train",
                        encoder=parent.sha256)
            return found.to(device)

        made = on_main(make_labels, ctx)
        labels = broadcast_from_main(made if made is not None else torch.empty(len(data), dtype=torch.long, device=device),
                                     ctx)
    train = dataclasses.replace(data, labels=labels, num_classes=settings.clusters)

    torch.manual_seed(settings.seed)
    model = prepare_model(runtime.place(build_network(encoder, keep, settings.clusters)), ctx)
    probes, total = settings.probe_epochs, settings.probe_epochs + settings.epochs
    probe_opt, full_opt = optimizers(model, settings)

    def optimizer_of(epoch: int):  # the optimizer that trains epoch `epoch` (0-based)
        return probe_opt if epoch < probes else full_opt

    start = restore(state, model, optimizer_of(int(state["epoch"]))) if state is not None else 0
    extra = dict(state["extra"]) if state is not None else {"parent": parent.sha256, "labels": labels.cpu()}
    extra["runtime"] = runtime.record()
    model = runtime.compiled(model)
    batches = Batches(train, settings.batch_size, seed=settings.seed, drop_last=True)
    out_file = run.artifact(ENCODER_FILE)
    last = {"metrics": (run.read_metrics() or [{}])[-1] if start else {}}

    def end_epoch(done: int, metrics: dict) -> None:
        last["metrics"] = metrics = {**metrics, "phase": "probe" if done <= probes else "trades"}
        if not ctx.is_main:
            return
        run.append_metrics(metrics)
        if done == total:
            save_model(out_file, backbone_with_bn_set(unwrap(model), keep), kind="encoder", method=output_method(parent),
                       dataset=data.name, eps=settings.eps, config={**config, "runtime": extra["runtime"]},
                       metrics=metrics, parent=parent.sha256,
                       rescue=True)
        run.save_state(model, optimizer_of(done), epoch=done, total_epochs=total, config=config, extra=extra)

    steps = Steps(settings, bn)
    phases = [("probe", steps.probe, MultiStep(settings.probe_lr), 0, probes),
              ("trades", steps.trades, MultiStep(settings.lr, tuple(m + probes for m in settings.milestones)), probes, total)]
    if ctx.is_main:
        what = f"resuming after epoch {start}" if start else "post-processing"
        reporter.log(
            f"{what}: LPAFT of {parent.path} on {data.name} ({len(data)} images, {settings.clusters} pseudo classes), "
            f"{plural(probes, 'probe epoch')} + {plural(settings.epochs, 'TRADES epoch')} of "
            f"{plural(len(batches), 'step')}, batch {settings.batch_size}, BN {'/'.join(keep)}, {runtime.describe()} "
            f"-> {run.path}"
        )
    for name, loss, schedule, first, end in phases:
        if start >= end:
            continue
        unwrap(model).backbone.requires_grad_(name == "trades")
        Loop(model=model, optimizer=optimizer_of(first), batches=batches, schedule=schedule, name=f"lpaft {name}",
             step=supervised_step(lambda x, y, gen, loss=loss: loss(model, x, y, gen, precision, device), ctx),
             seed=settings.seed, device=device, precision=precision, ctx=ctx, reporter=reporter,
             last_good=lambda: f"the last good state is in {run.state_path}").run(max(start, first), end, end_epoch)
    shutdown(ctx)
    return RunResult(out_file, run.path, total, last["metrics"], ctx.is_main, runtime=extra["runtime"])
