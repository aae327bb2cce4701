"""The pretraining loop: any method of ``advcl_cli.methods``, SGD, the warm-up + cosine schedule.

Top to bottom: the training split goes to the device as uint8; the method's model is built
(seeded, channels_last; ``compile`` compiles the backbone and projection head in place, so the
saved weight names do not change); every epoch takes the global batches of ``Batches`` (order a
function of seed and epoch) and a random stream seeded from (seed, epoch), so a resumed run
draws exactly what an uninterrupted one does; under torchrun every rank walks the same global
batches and the method keeps the rank's slice, so N processes match one process exactly. Per step: lr from the schedule,
``method.step`` under autocast, backward, ``sync_gradients``, SGD step. The loss terms are summed
on the device and read once per logging interval, where the NaN/inf guard is checked too (no
device sync per step). After every epoch rank 0 appends to ``metrics.jsonl`` and saves the
resume state; every ``save_every`` epochs and at the end it saves ``encoder.safetensors``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from ..checkpoint import save_model
from .device import autocast, resolve_device, resolve_precision
from .distributed import init_distributed, prepare_model, reduce_mean, shutdown, sync_gradients
from .report import Reporter
from .run import FiniteGuard, RunDir, RunResult, check_resume_config, epoch_generator, load_split, open_run, restore
from .schedule import WarmupCosine, set_lr

ENCODER_FILE = "encoder.safetensors"
LOG_EVERY = 10  # steps between progress updates / NaN checks
# settings that may change when a run is resumed (they do not change what is computed)
RESUME_MAY_CHANGE = {"device", "precision", "compile", "out", "data_dir", "download", "save_every"}


def default_run_dir(settings) -> Path:
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.dataset).strip("_")
    return Path("runs") / f"{settings.method}-{dataset}-{settings.arch}"


def schedule_for(settings) -> WarmupCosine:
    warmup = settings.warmup_epochs
    if warmup is None:  # the paper's rule: warm up for 10 epochs when the batch exceeds 256
        warmup = 10 if settings.batch_size > 256 else 0
    return WarmupCosine(
        base_lr=settings.lr,
        epochs=settings.epochs,
        warmup_epochs=min(warmup, settings.epochs),
        warmup_from=settings.warmup_from,
        min_ratio=settings.min_lr_ratio,
    )


def pretrain(settings, reporter: Reporter | None = None, *, resume: bool = False, force: bool = False) -> RunResult:
    from ..data.batches import Batches
    from ..methods import get_method
    from ..models import create_model

    reporter = reporter or Reporter()
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    ctx = init_distributed(device)
    run = RunDir(settings.out or default_run_dir(settings), artifacts=(ENCODER_FILE,))
    method_cls = get_method(settings.method)
    state = open_run(run, ctx, batch_size=settings.batch_size, resume=resume, force=force)
    if state is not None:
        check_resume_config(state["config"], settings.to_config(), RESUME_MAY_CHANGE)
        if state.get("finished"):
            if ctx.is_main:
                reporter.log(f"{run.path} already finished all {state['epoch']} epochs")
            metrics = (run.read_metrics() or [{}])[-1]
            shutdown(ctx)
            return RunResult(run.artifact(ENCODER_FILE), run.path, int(state["epoch"]), metrics, ctx.is_main)

    data = load_split(
        settings.dataset, "train", ctx, data_dir=settings.data_dir, download=settings.download,
        limit=settings.limit, image_size=settings.image_size,
    ).to(device)
    method = method_cls(settings, n_images=len(data), device=device)
    if ctx.is_main:
        for note in method.notes:
            reporter.warn(note)

    torch.manual_seed(settings.seed)
    model = create_model(settings.arch, **method.model_config(settings.arch)).to(device)
    model = model.to(memory_format=torch.channels_last) if device.type == "cuda" else model
    # before the optimizer exists: with several processes it swaps the BN modules (new parameters)
    model = prepare_model(model, ctx)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    start = restore(state, model, optimizer) if state is not None else 0
    if settings.compile:
        model.backbone.compile()
        if model.proj is not None:
            model.proj.compile()
    # every rank walks the same global batches; the method keeps this rank's slice. The last
    # partial batch is kept (as the reference's DataLoader does) unless --drop-last, or when it
    # has a single image (batch norm needs two) or does not divide among the processes
    batches = Batches(data, settings.batch_size, seed=settings.seed, drop_last=settings.drop_last,
                      ranks=ctx.world_size, min_last=2, require_full=True)
    schedule = schedule_for(settings)
    steps = len(batches)
    encoder = run.artifact(ENCODER_FILE)
    last_saved = f"the last saved encoder is {encoder}" if encoder.exists() else "no encoder was saved yet"
    metrics: dict = (run.read_metrics() or [{}])[-1] if start else {}

    if ctx.is_main:
        what = f"resuming after epoch {start}" if start else "training"
        reporter.log(
            f"{what}: {settings.method} on {data.name} ({len(data)} images), {settings.arch}, "
            f"{settings.epochs} epochs of {steps} steps, batch {settings.batch_size}, {device.type} {precision} -> {run.path}"
        )
        reporter.start("pretrain", total=(settings.epochs - start) * steps)
    model.train()
    for epoch in range(start, settings.epochs):
        batches.set_epoch(epoch)
        gen = epoch_generator(settings.seed, epoch, device)
        guard, sums, seen = FiniteGuard(), {}, 0
        t0 = time.perf_counter()
        info: dict = {"epoch": f"{epoch + 1}/{settings.epochs}"}
        for step, (images, _, indices) in enumerate(batches):
            lr = schedule.lr(epoch, step, steps)
            set_lr(optimizer, lr)
            with autocast(precision, device):
                loss, terms = method.step(model, images, indices, gen, ctx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync_gradients(model, ctx)
            optimizer.step()
            guard.update(loss, step)
            seen += images.shape[0]
            for name, value in {"loss": loss.detach(), **terms}.items():
                sums[name] = sums.get(name, 0) + value.float()
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                guard.check(epoch + 1, last_saved, ctx)
                info["loss"] = float(sums["loss"]) / (step + 1)
                info["img_s"] = seen / (time.perf_counter() - t0)
            if ctx.is_main:
                reporter.advance(1, **info)
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "lr": lr}
        metrics.update({k: float(reduce_mean(v / steps, ctx)) for k, v in sums.items()})
        metrics.update({"images_per_s": seen / seconds, "seconds": seconds})
        if ctx.is_main:
            run.append_metrics(metrics)
            done = epoch + 1
            if done % settings.save_every == 0 or done == settings.epochs:
                save_model(
                    encoder, model, kind="encoder", method=settings.method, dataset=data.name,
                    eps=method.eps, config=settings.to_config(), metrics=metrics,
                )
                last_saved = f"the last saved encoder is {encoder} (epoch {done})"
            run.save_state(model, optimizer, epoch=done, total_epochs=settings.epochs, config=settings.to_config())
    if ctx.is_main:
        reporter.finish()
    shutdown(ctx)
    return RunResult(encoder, run.path, settings.epochs, metrics, ctx.is_main)
