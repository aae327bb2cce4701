"""The pretraining loop: any method of ``advcl_cli.methods``, with its optimizer and schedule.

Top to bottom: the files the method's settings name (pseudo labels, a teacher checkpoint) are
checked, the training split goes to the device as uint8, the files are read and handed to the
method; the method's model is built (seeded, channels_last; ``compile`` compiles the backbone
and projection head in place, so the saved weight names do not change); every epoch takes the
global batches of ``Batches`` (order a function of seed and epoch) and a random stream seeded
from (seed, epoch), so a resumed run draws exactly what an uninterrupted one does; under
torchrun every rank walks the same global batches and the method keeps the rank's slice, so N
processes match one process exactly. Per step: lr from the method's schedule, ``method.step``
under autocast, backward, ``sync_gradients``, the optimizer step, ``method.after_step``. The
loss terms are summed
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
from ..errors import UsageError
from ..optim import set_lr
from .device import autocast, resolve_device, resolve_precision
from .distributed import init_distributed, prepare_model, reduce_mean, shutdown, sync_gradients
from .report import Reporter
from .run import FiniteGuard, RunDir, RunResult, check_resume_config, epoch_generator, load_split, open_run, restore

ENCODER_FILE = "encoder.safetensors"
LOG_EVERY = 10  # steps between progress updates / NaN checks
# settings that may change when a run is resumed (they do not change what is computed)
RESUME_MAY_CHANGE = {"device", "precision", "compile", "out", "data_dir", "download", "save_every"}


def default_run_dir(settings) -> Path:
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.dataset).strip("_")
    return Path("runs") / f"{settings.method}-{dataset}-{settings.arch}"


def input_fields(settings) -> dict[str, tuple[str, Path]]:
    """The files the settings name for the engine to read: field -> (kind, path)."""
    out = {}
    for name, field in type(settings).model_fields.items():
        kind = (field.json_schema_extra or {}).get("input")
        value = getattr(settings, name)
        if kind is not None and value is not None:
            out[name] = (kind, Path(value))
    return out


def check_inputs(settings) -> None:
    """Before any expensive step: every input file exists."""
    for name, (kind, path) in input_fields(settings).items():
        if not path.is_file():
            what = "pseudo-label file" if kind == "labels" else "checkpoint file"
            hint = "make one with `advcl pseudo-labels --encoder CKPT`" if kind == "labels" else "check the path"
            raise UsageError(f"no such {what}: {path} (--{name.replace('_', '-')})", hint)


def load_inputs(settings, n_images: int) -> dict:
    """The input files, read: pseudo labels checked against the dataset's size, checkpoints
    validated."""
    from ..checkpoint import load_checkpoint
    from ..pseudolabels import load_labels

    inputs = {}
    for name, (kind, path) in input_fields(settings).items():
        if kind == "labels":
            inputs[name] = load_labels(path, n_images, allow_longer=settings.limit is not None)
        else:
            inputs[name] = load_checkpoint(path)
    return inputs


def make_method(settings, n_images: int, device: torch.device | str = "cpu"):
    """The settings' method for a dataset of ``n_images``, with its input files read."""
    from ..methods import get_method

    check_inputs(settings)
    return get_method(settings.method)(settings, n_images=n_images, device=device, inputs=load_inputs(settings, n_images))


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
    check_inputs(settings)
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
    method = make_method(settings, len(data), device)
    if ctx.is_main:
        for note in method.notes:
            reporter.warn(note)

    torch.manual_seed(settings.seed)
    model = create_model(settings.arch, **method.model_config(settings.arch)).to(device)
    model = model.to(memory_format=torch.channels_last) if device.type == "cuda" else model
    # before the optimizer exists: with several processes it swaps the BN modules (new parameters)
    model = prepare_model(model, ctx)
    optimizer = method.optimizer(model.parameters())
    start = restore(state, model, optimizer) if state is not None else 0
    if state is not None:
        method.load_state(state["extra"].get("method", {}))
    if settings.compile:
        model.backbone.compile()
        if model.proj is not None:
            model.proj.compile()
    # every rank walks the same global batches; the method keeps this rank's slice
    batches = Batches(data, settings.batch_size, seed=settings.seed)
    schedule = method.schedule()
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
        method.start_epoch(epoch)
        gen = epoch_generator(settings.seed, epoch, device)
        guard, sums = FiniteGuard(), {}
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
            method.after_step(model)
            guard.update(loss, step)
            for name, value in {"loss": loss.detach(), **terms}.items():
                sums[name] = sums.get(name, 0) + value.float()
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                guard.check(epoch + 1, last_saved, ctx)
                info["loss"] = float(sums["loss"]) / (step + 1)
                info["img_s"] = (step + 1) * settings.batch_size / (time.perf_counter() - t0)
            if ctx.is_main:
                reporter.advance(1, **info)
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "lr": lr}
        metrics.update({k: float(reduce_mean(v / steps, ctx)) for k, v in sums.items()})
        metrics.update({"images_per_s": steps * settings.batch_size / seconds, "seconds": seconds})
        if ctx.is_main:
            run.append_metrics(metrics)
            done = epoch + 1
            if done % settings.save_every == 0 or done == settings.epochs:
                save_model(
                    encoder, model, kind="encoder", method=settings.method, dataset=data.name,
                    eps=method.eps, config=settings.to_config(), metrics=metrics,
                )
                last_saved = f"the last saved encoder is {encoder} (epoch {done})"
            run.save_state(model, optimizer, epoch=done, total_epochs=settings.epochs, config=settings.to_config(),
                           extra={"method": method.state()})
    if ctx.is_main:
        reporter.finish()
    shutdown(ctx)
    return RunResult(encoder, run.path, settings.epochs, metrics, ctx.is_main)
