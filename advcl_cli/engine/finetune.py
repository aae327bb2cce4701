"""Robust finetuning of a pretrained encoder: SLF, ALF and AFF.

Schemes (the protocol of the AdvCL paper and the RobustSSL benchmark):

- ``slf`` standard linear finetuning: the encoder is frozen and stays in eval mode; a linear
  head is trained with cross-entropy on clean images.
- ``alf`` adversarial linear finetuning: encoder frozen, eval mode; the head is trained on
  PGD-10 examples (eps 8/255, step 2/255, uniform random start) made against the whole model.
- ``aff`` adversarial full finetuning: the whole network trains with TRADES (beta 6): the
  adversary (10 steps of 2/255 from ``x + 0.001 N(0, 1)`` on the summed KL) runs with the model
  in eval mode, then the clean and adversarial forward passes run in train mode and the loss is
  ``CE(f(x), y) + beta * KL_sum(f(x_adv) || f(x)) / B``.

Facts matched from the reference finetuning code (RobustSSL ``finetuning_utils.py``, AdvCL
``finetuning_advCL_SLF.py``): training images get RandomCrop(padding 4) + horizontal flip,
test images none; SGD with momentum 0.9 and weight decay 2e-4 on the trained parameters only
(the head for SLF/ALF); the rate is multiplied by 0.1 at each milestone epoch. Defaults:
SLF/ALF batch 512, lr 0.01, milestones 10, 20; AFF batch 128, lr 0.1, milestones 15, 20;
25 epochs. Finetuning starts from the encoder's "pgd" BN set when it has one (AdvCL), else its
only set (SimCLR); a classifier checkpoint (e.g. from SLF) can be finetuned again (e.g. AFF).

No model selection on the test set: the last epoch is kept, or with ``val_fraction`` that part
of the training split is held out and the epoch with the best PGD-20 accuracy on it is kept.
At the end the kept model's clean and PGD-20 accuracy on the test split (``eval_limit`` first
images) go into the checkpoint's metrics as fractions: ``clean_acc``, ``pgd20_acc``, ``n_eval``.

The run folder works as in pretraining (``engine.run``): ``classifier.safetensors``,
``state.safetensors`` after every epoch, ``metrics.jsonl``; ``resume`` continues it.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import torch

from ..attacks.pgd import pgd, trades_adversary, trades_objective
from ..checkpoint import Checkpoint, save_model, unwrap
from ..errors import DataError, UsageError
from .device import autocast, resolve_device, resolve_precision
from .distributed import init_distributed, local_slice, prepare_model, reduce_mean, shutdown, sync_gradients
from .evaluate import evaluate
from .report import Reporter
from .run import FiniteGuard, RunDir, RunResult, check_resume_config, epoch_generator, load_split, open_run, restore
from .schedule import MultiStep, set_lr

CLASSIFIER_FILE = "classifier.safetensors"
LOG_EVERY = 10
SCHEME_DEFAULTS = {
    "slf": {"batch_size": 512, "lr": 0.01, "milestones": [10, 20]},
    "alf": {"batch_size": 512, "lr": 0.01, "milestones": [10, 20]},
    "aff": {"batch_size": 128, "lr": 0.1, "milestones": [15, 20]},
}
# settings that may change on --resume (they do not change what is trained)
RESUME_MAY_CHANGE = {"device", "precision", "out", "data_dir", "download", "eval_limit"}


def with_scheme_defaults(settings):
    """The settings with batch size, lr and milestones filled in from the scheme."""
    fill = {k: v for k, v in SCHEME_DEFAULTS[settings.scheme].items() if getattr(settings, k) is None}
    return settings.model_copy(update=fill) if fill else settings


def default_run_dir(settings, parent: Checkpoint) -> Path:
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.dataset or parent.meta.dataset).strip("_")
    return Path("runs") / f"{parent.meta.method}-{settings.scheme}-{dataset}-{parent.sha256[:8]}"


def build_classifier(parent: Checkpoint, num_classes: int, bn_set: str = "pgd", reporter: Reporter | None = None):
    """The model to finetune: the encoder's backbone (BN set ``bn_set``, or its only set when it
    has no "pgd" set and the default was asked for) with a new linear head; a classifier as is."""
    from ..models import backbone_with_bn_set

    net = parent.build("cpu")
    if parent.meta.kind == "classifier":
        if net.config.num_classes != num_classes:
            raise DataError(
                f"the classifier {parent.path} has {net.config.num_classes} classes, the dataset {num_classes}",
                "finetune on a dataset with the same classes, or start from the encoder",
            )
        return net
    sets = net.config.bn_sets
    if bn_set not in sets and bn_set == "pgd":
        bn_set = sets[0]
        if reporter is not None and len(sets) > 1:
            reporter.warn(f"the encoder has no 'pgd' batch-norm set; starting from '{bn_set}'")
    return backbone_with_bn_set(net, bn_set, num_classes=num_classes)


def _subset(data, idx: torch.Tensor):
    return dataclasses.replace(data, images=data.images[idx], labels=data.labels[idx])


def split_validation(data, fraction: float, seed: int):
    """(train, val): a seeded random ``fraction`` of the images held out (None when 0)."""
    if fraction <= 0:
        return data, None
    n = len(data)
    n_val = int(round(n * fraction))
    if n_val < 1 or n_val >= n:
        raise UsageError(f"--val-fraction {fraction} of {n} training images leaves an empty split", "use a fraction like 0.1")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _subset(data, perm[n_val:].sort().values), _subset(data, perm[:n_val].sort().values)


def finetune(settings, parent: Checkpoint, reporter: Reporter | None = None, *, resume: bool = False,
             force: bool = False) -> RunResult:
    """Finetune ``parent`` (an encoder or classifier checkpoint) with ``settings.scheme``."""
    from ..data.augment import crop_flip_view
    from ..data.batches import Batches
    from ..data.registry import load_dataset

    reporter = reporter or Reporter()
    settings = with_scheme_defaults(settings)
    scheme = settings.scheme
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    ctx = init_distributed(device)
    dataset = settings.dataset or parent.meta.dataset
    run = RunDir(settings.out or default_run_dir(settings, parent), artifacts=(CLASSIFIER_FILE,))
    config = settings.to_config()
    state = open_run(run, ctx, batch_size=settings.batch_size, resume=resume, force=force)
    if not ctx.is_main:
        reporter = Reporter()  # only rank 0 reports
    if state is not None:
        check_resume_config(state["config"], config, RESUME_MAY_CHANGE)
        if state["extra"].get("parent") != parent.sha256:
            raise UsageError(
                f"{run.path} finetunes another checkpoint (sha256 {str(state['extra'].get('parent'))[:12]}...)",
                "resume with the checkpoint it started from, or start over with --force",
            )
        if state.get("finished") and "final" in state["extra"]:
            reporter.log(f"{run.path} already finished all {state['epoch']} epochs")
            shutdown(ctx)
            return RunResult(run.artifact(CLASSIFIER_FILE), run.path, int(state["epoch"]),
                                  state["extra"].get("final", {}), ctx.is_main)

    load = dict(data_dir=settings.data_dir, download=settings.download, image_size=settings.image_size)
    full = load_split(dataset, "train", ctx, limit=settings.limit, **load)
    train, val = split_validation(full, settings.val_fraction, settings.seed)
    train, val = train.to(device), (val.to(device) if val is not None else None)

    torch.manual_seed(settings.seed)
    model = build_classifier(parent, full.num_classes, settings.bn_set, reporter).to(device)
    frozen = scheme in ("slf", "alf")
    if frozen:
        model.backbone.requires_grad_(False)
    else:  # before the optimizer exists: with several processes it swaps the BN modules
        model = prepare_model(model, ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    start = restore(state, model, optimizer) if state is not None else 0
    extra = dict(state["extra"]) if state is not None else {"parent": parent.sha256}
    # every rank walks the same global batches and keeps its slice; with several processes the
    # last partial batch is dropped so that every rank gets an equal share
    batches = Batches(train, settings.batch_size, seed=settings.seed, drop_last=ctx.enabled)
    schedule = MultiStep(settings.lr, tuple(settings.milestones))
    steps = len(batches)
    out_file = run.artifact(CLASSIFIER_FILE)
    eps, step_size, n_steps = settings.eps, settings.attack_step_size, settings.attack_steps
    save_args = dict(kind="classifier", method=parent.meta.method, dataset=full.name, eps=eps, config=config, parent=parent.sha256)

    if ctx.is_main:
        what = f"resuming after epoch {start}" if start else "finetuning"
        held = f", {len(val)} held out for selection" if val is not None else ""
        reporter.log(
            f"{what}: {scheme.upper()} of {parent.path} on {full.name} ({len(train)} images{held}), "
            f"{settings.epochs} epochs of {steps} steps, batch {settings.batch_size}, lr {settings.lr}, "
            f"{device.type} {precision} -> {run.path}"
        )
        reporter.start(f"finetune {scheme}", total=(settings.epochs - start) * steps)
    for epoch in range(start, settings.epochs):
        batches.set_epoch(epoch)
        gen = epoch_generator(settings.seed, epoch, device)
        lr = schedule.lr(epoch)
        set_lr(optimizer, lr)
        guard = FiniteGuard()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        t0 = time.perf_counter()
        info: dict = {"epoch": f"{epoch + 1}/{settings.epochs}"}
        for step, (images, labels, _) in enumerate(batches):
            x, labels = local_slice(crop_flip_view(images, gen), ctx), local_slice(labels, ctx)
            if frozen:
                model.eval()  # the encoder's BN statistics never move
                if scheme == "alf":
                    with autocast(precision, device):
                        x = pgd(model, x, labels, eps, n_steps, step_size, gen=gen)
                with torch.no_grad(), autocast(precision, device):
                    feat = model.features(x)
                with autocast(precision, device):
                    logits = model.fc(feat.float())
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            else:
                model.eval()
                with autocast(precision, device):
                    x_adv = trades_adversary(model, x, eps, n_steps, step_size, gen=gen)
                model.train()
                with autocast(precision, device):
                    logits = model(x)
                    loss = trades_objective(logits, model(x_adv), labels, settings.trades_beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync_gradients(model, ctx)
            optimizer.step()
            guard.update(loss, step)
            loss_sum += loss.detach().float() * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum()
            seen += labels.shape[0]
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                guard.check(epoch + 1, "the last good state is in " + str(run.state_path), ctx)
                info["loss"] = float(loss_sum) / seen
                info["img_s"] = seen / (time.perf_counter() - t0)
            if ctx.is_main:
                reporter.advance(1, **info)
        seconds = time.perf_counter() - t0
        model.eval()
        metrics = {
            "epoch": epoch + 1, "lr": lr,
            "loss": float(reduce_mean(loss_sum / max(seen, 1), ctx)),
            "train_acc": float(reduce_mean(correct.float() / max(seen, 1), ctx)),
            "images_per_s": seen * ctx.world_size / seconds, "seconds": seconds,
        }
        if ctx.is_main:
            if val is not None:
                res = evaluate(model, val, ["pgd20"], [eps], device=device, seed=settings.seed)
                metrics.update(val_clean_acc=res["clean_acc"], val_pgd20_acc=res["robust"][0]["robust_acc"])
                reporter.log(
                    f"epoch {epoch + 1}: validation clean {res['clean_acc']:.2%}, PGD-20 {metrics['val_pgd20_acc']:.2%}"
                )
                if metrics["val_pgd20_acc"] > extra.get("best_val_pgd20_acc", -1.0):
                    extra.update(best_val_pgd20_acc=metrics["val_pgd20_acc"], best_epoch=epoch + 1,
                                 best_val_clean_acc=res["clean_acc"])
                    save_model(out_file, model, metrics=metrics, **save_args)
            run.append_metrics(metrics)
            run.save_state(model, optimizer, epoch=epoch + 1, total_epochs=settings.epochs, config=config, extra=extra)
    # every rank leaves the process group together; rank 0 alone evaluates and saves
    shutdown(ctx)
    if not ctx.is_main:
        return RunResult(out_file, run.path, settings.epochs, {}, False)
    reporter.finish()

    # the kept model: the best epoch on the held-out split, else the last one
    if val is not None:
        from ..checkpoint import load_checkpoint

        unwrap(model).load_state_dict(load_checkpoint(out_file).tensors)
        reporter.log(f"keeping epoch {extra['best_epoch']} (best PGD-20 accuracy on the held-out split)")
    test = load_dataset(dataset, "test", limit=settings.eval_limit, **load)
    res = evaluate(model, test, ["pgd20"], [eps], device=device, reporter=reporter, seed=settings.seed)
    final = {
        "clean_acc": res["clean_acc"],
        "pgd20_acc": res["robust"][0]["robust_acc"],
        "n_eval": res["n"],
        "eps": eps,
        "epoch": extra.get("best_epoch", settings.epochs),
        "selection": "best val PGD-20" if val is not None else "last epoch",
    }
    if val is not None:
        final.update(val_clean_acc=extra["best_val_clean_acc"], val_pgd20_acc=extra["best_val_pgd20_acc"])
    save_model(out_file, model, metrics=final, **save_args)
    extra["final"] = final
    run.save_state(model, optimizer, epoch=settings.epochs, total_epochs=settings.epochs, config=config, extra=extra)
    return RunResult(out_file, run.path, settings.epochs, final)
