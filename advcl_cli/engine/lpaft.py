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
from ..distributed import broadcast_from_main, on_main, prepare_model
from .finetune import head_loss, supervised_step, trades_step
from ..report import Reporter, plural
from .lifecycle import Lifecycle
from .run import RunDir, RunResult, check_derived, check_parent, holds_run_folder, load_split

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


def pseudo_labels(settings, parent: Checkpoint, encoder, data, cluster_bn: str, life: Lifecycle) -> torch.Tensor:
    """The k-means labels of the training split on every rank: from the resume state, or made
    by rank 0 (and written to the run folder) and broadcast."""
    if life.state is not None:
        return life.extra["labels"].to(life.device)

    def make_labels():
        life.reporter.log(f"k-means ({settings.clusters} clusters) on the features of {len(data)} {data.name} images "
                          f"through '{cluster_bn}'")
        found = cluster_labels(encoder.to(life.device), data.images, settings, cluster_bn)
        save_labels(life.run.artifact(LABELS_FILE), {settings.clusters: found}, dataset=data.name, split="train",
                    encoder=parent.sha256)
        return found.to(life.device)

    made = on_main(make_labels, life.ctx)
    empty = torch.empty(len(data), dtype=torch.long, device=life.device)
    return broadcast_from_main(made if made is not None else empty, life.ctx)


class PostProcessing:
    """LPAFT's two phases over one network: the optimizer of each epoch, the end of epoch (rank 0:
    the metrics line with its phase, the encoder after the last epoch, the resume state)."""

    def __init__(self, settings, parent: Checkpoint, life: Lifecycle, model, keep: tuple[str, ...], labels, data_name: str):
        self.s, self.parent, self.life, self.model, self.keep, self.data_name = settings, parent, life, model, keep, data_name
        self.probes, self.total = settings.probe_epochs, settings.probe_epochs + settings.epochs
        self.probe_opt, self.full_opt = optimizers(model, settings)
        self.out_file = life.run.artifact(ENCODER_FILE)
        self.extra = dict(life.extra) if life.state is not None else {"parent": parent.sha256, "labels": labels.cpu()}

    def optimizer_of(self, epoch: int):
        """The optimizer that trains epoch ``epoch`` (0-based)."""
        return self.probe_opt if epoch < self.probes else self.full_opt

    def end_epoch(self, done: int, metrics: dict) -> None:
        metrics["phase"] = "probe" if done <= self.probes else "trades"
        if not self.life.is_main:
            return
        self.life.run.append_metrics(metrics)
        if done == self.total:
            save_model(self.out_file, backbone_with_bn_set(unwrap(self.model), self.keep), kind="encoder",
                       method=output_method(self.parent), dataset=self.data_name, eps=self.s.eps,
                       config={**self.life.config, "runtime": self.extra["runtime"]}, metrics=metrics,
                       parent=self.parent.sha256, rescue=True)
        self.life.run.save_state(**self.state_of(done))

    def state_of(self, done: int) -> dict:
        """The resume state after ``done`` epochs (``RunDir.save_state``'s arguments)."""
        return dict(model=self.model, optimizer=self.optimizer_of(done), epoch=done, total_epochs=self.total,
                    config=self.life.config, extra=self.extra)


@holds_run_folder
def lpaft(settings, parent: Checkpoint, reporter: Reporter | None = None, *, resume: bool | str | None = None,
          force: bool = False) -> RunResult:
    """DynACL++'s post-processing of the encoder ``parent``; returns the new encoder's path."""
    if parent.meta.kind != "encoder":
        raise UsageError(f"{parent.path} is a {parent.meta.kind} checkpoint; lpaft post-processes a pretrained encoder",
                         "pass the encoder from advcl pretrain --method dynacl")
    dataset = settings.dataset or parent.meta.dataset
    encoder = parent.build("cpu")
    bn, keep, cluster_bn = bn_routes(encoder.config.bn_sets, settings)
    run = RunDir(settings.out or default_run_dir(settings, parent), artifacts=(ENCODER_FILE, LABELS_FILE), verb="lpaft")
    check_derived(run, parent, dataset, "post-processes")
    with Lifecycle(settings, run, reporter, resume=resume, force=force) as life:
        if life.state is not None:
            check_parent(life.state, parent.sha256, run, "post-processes")
        if life.finished():
            return life.finished_result(ENCODER_FILE)
        if parent.meta.method not in DYNACL_FAMILY:
            life.reporter.warn(f"lpaft is DynACL++'s post-processing; this encoder was pretrained with "
                               f"'{parent.meta.method}'")
        data = load_split(dataset, "train", life.ctx, data_dir=settings.data_dir, download=settings.download,
                          limit=settings.limit, image_size=settings.image_size).to(life.device)
        if settings.clusters > len(data):
            raise DataError(f"cannot make {settings.clusters} clusters from {len(data)} images", "use fewer --clusters")
        Batches(data, settings.batch_size, drop_last=True)  # a batch larger than the data is refused before k-means
        life.begin()
        labels = pseudo_labels(settings, parent, encoder, data, cluster_bn, life)
        train = dataclasses.replace(data, labels=labels, num_classes=settings.clusters)
        torch.manual_seed(settings.seed)
        model = prepare_model(life.runtime.place(build_network(encoder, keep, settings.clusters)), life.ctx)
        job = PostProcessing(settings, parent, life, model, keep, labels, data.name)
        if life.state is not None:
            life.restore(model, job.optimizer_of(int(life.state["epoch"])))
        job.extra["runtime"] = life.runtime.record()
        model = life.runtime.compiled(model)
        batches = Batches(train, settings.batch_size, seed=settings.seed, drop_last=True)
        steps, probes, total = Steps(settings, bn), job.probes, job.total
        phases = [("probe", steps.probe, MultiStep(settings.probe_lr), 0, probes),
                  ("trades", steps.trades, MultiStep(settings.lr, tuple(m + probes for m in settings.milestones)), probes,
                   total)]
        life.banner("post-processing", f"LPAFT of {parent.path} on {data.name} ({len(data)} images, {settings.clusters} "
                                       f"pseudo classes), {plural(probes, 'probe epoch')} + "
                                       f"{plural(settings.epochs, 'TRADES epoch')} of {plural(len(batches), 'step')}, "
                                       f"batch {settings.batch_size}, BN {'/'.join(keep)}")
        for name, loss, schedule, first, end in phases:
            if life.start >= end:
                continue
            unwrap(model).backbone.requires_grad_(name == "trades")
            loop = life.loop(model=model, optimizer=job.optimizer_of(first), batches=batches, schedule=schedule,
                             name=f"lpaft {name}", last_good=lambda: f"the last good state is in {run.state_path}",
                             step=supervised_step(lambda x, y, gen, loss=loss: loss(model, x, y, gen, life.runtime.precision,
                                                                                    life.device), life.ctx))
            life.train(loop, first, end, job.end_epoch, job.state_of)
    return life.result(job.out_file, total)
