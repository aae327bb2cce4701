"""The pretraining engine: any method of ``advcl_cli.methods``, with its optimizer and schedule.

Top to bottom: what can be refused before any work is (``check_settings``: the dataset's
name, the files the method's settings name, such as pseudo labels or a teacher checkpoint;
then the run folder, without writing to it; ``--pgd-steps 0`` for a robust method gets a
warning, and its encoder records no eps); the
training split goes to the device as uint8, the files are read and handed to the method; the
method's model is built (seeded, then ``method.init_model``, where DeACL loads its
teacher's weights; placed by the ``Runtime`` of the settings: channels_last when on, and
``compile`` compiles the backbone and projection head in place, so the saved weight names do
not change); the run folder is created
(``begin_run``), and the shared epoch loop (``engine.loop``) runs ``method.step`` on the global
batches of ``Batches``.
Under torchrun every rank walks the same global batches and the method keeps the rank's slice,
so N processes match one process. After every epoch rank 0 appends to ``metrics.jsonl`` and
saves the resume state (the method's own tensors included, and the sha256 of every input file);
every ``save_every`` epochs and at the end it then saves ``encoder.safetensors``: the network
``method.export(model)`` names (the trained one, or DynACL's momentum encoder). The state says
"finished" only once the last encoder is on disk, so a crash between the two writes resumes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, check_checkpoint, load_checkpoint, save_model, sha256_file
from ..data.batches import Batches
from ..data.registry import num_classes_of
from ..errors import UsageError, require_file
from ..methods import get_method
from ..methods.rcs import Coreset
from ..models import create_model
from ..pseudolabels import load_labels
from ..device import runtime_of
from ..distributed import init_distributed, prepare_model, shutdown
from .loop import Loop
from ..report import Reporter, plural
from .run import RunDir, RunResult, begin_run, check_resume_config, holds_run_folder, load_split, open_run, restore

ENCODER_FILE = "encoder.safetensors"
# settings that may change when a run is resumed (they do not change what is computed)
RESUME_MAY_CHANGE = {"device", "precision", "channels_last", "compile", "out", "data_dir", "download", "save_every"}


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
    """Before any expensive step: every input file exists and is what it should be (a labels
    file's labels in range and of one length, a checkpoint's header valid)."""
    for name, (kind, path) in input_fields(settings).items():
        what = "pseudo-label file" if kind == "labels" else "checkpoint file"
        hint = "make one with `advcl pseudo-labels --encoder CKPT`" if kind == "labels" else "check the path"
        require_file(path, what, hint, flag=f" (--{name.replace('_', '-')})")
        if kind == "labels":
            load_labels(path)
        else:
            check_checkpoint(path)


def check_settings(settings) -> None:
    """What can be refused before anything is loaded: an unknown dataset, input files that are
    missing or malformed."""
    num_classes_of(settings.dataset)  # a DataError naming the closest known dataset
    check_inputs(settings)


def without_attack(settings) -> bool:
    """A robust method told to take no PGD steps: it trains without adversarial examples (an
    ablation, or a test that wants no attack), so its encoder is not robust and records no eps."""
    return getattr(settings, "pgd_steps", None) == 0


def load_inputs(settings, n_images: int) -> dict:
    """The input files, read: pseudo labels checked against the dataset's size, checkpoints
    validated."""
    inputs = {}
    for name, (kind, path) in input_fields(settings).items():
        if kind == "labels":
            inputs[name] = load_labels(path, n_images, allow_longer=settings.limit is not None)
        else:
            inputs[name] = load_checkpoint(path)
    return inputs


def make_method(settings, n_images: int, device: torch.device | str = "cpu"):
    """The settings' method for a dataset of ``n_images``, with its input files read."""
    check_inputs(settings)
    return get_method(settings.method)(settings, n_images=n_images, device=device, inputs=load_inputs(settings, n_images))


def input_digests(settings) -> dict[str, str]:
    """The sha256 of every input file (``--pseudo-labels``, ``--teacher``), kept in the resume
    state: a resumed run reads the same bytes."""
    return {name: sha256_file(path) for name, (_, path) in input_fields(settings).items()}


def check_inputs_unchanged(settings, stored: dict) -> None:
    for name, digest in input_digests(settings).items():
        if stored.get(name, digest) != digest:
            flag = f"--{name.replace('_', '-')}"
            raise UsageError(f"the {flag} file {getattr(settings, name)} is not the one this run started from "
                             f"(sha256 {digest[:12]}... now, {str(stored[name])[:12]}... then)",
                             f"resume with the same {flag} file, or start over with --force")


@holds_run_folder
def pretrain(settings, reporter: Reporter | None = None, *, resume: bool = False, force: bool = False) -> RunResult:
    reporter = reporter or Reporter()
    runtime = runtime_of(settings)
    device, precision = runtime.device, runtime.precision
    ctx = init_distributed(device)
    run = RunDir(settings.out or default_run_dir(settings), artifacts=(ENCODER_FILE,), verb="pretrain")
    check_settings(settings)
    for name, (_, path) in input_fields(settings).items():
        if run.holds(path):
            raise UsageError(f"--{name.replace('_', '-')} {path} is a file the run folder {run.path} writes",
                             "choose another --out, or move the file")
    state = open_run(run, ctx, batch_size=settings.batch_size, resume=resume, force=force)
    if without_attack(settings) and ctx.is_main:
        reporter.warn(f"--pgd-steps 0: {settings.method} trains without adversarial examples, so the encoder will not be "
                      "robust and records no eps (use --pgd-steps 1 or more, the paper uses 5)")
    if state is not None:
        check_resume_config(state["config"], settings.to_config(), RESUME_MAY_CHANGE)
        check_inputs_unchanged(settings, state["extra"].get("inputs", {}))
        if state.get("finished"):
            if ctx.is_main:
                reporter.log(f"{run.path} already finished all {state['epoch']} epochs")
            metrics = (run.read_metrics() or [{}])[-1]
            shutdown(ctx)
            return RunResult(run.artifact(ENCODER_FILE), run.path, int(state["epoch"]), metrics, ctx.is_main,
                             runtime=state["extra"].get("runtime", {}))

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
    method.init_model(model)  # the method's initial weights (DeACL: its teacher's), before anything copies them
    model = runtime.place(model)
    # before the optimizer exists: with several processes it swaps the BN modules (new parameters)
    model = prepare_model(model, ctx)
    optimizer = method.optimizer(model.parameters())
    start = restore(state, model, optimizer) if state is not None else 0
    if state is not None:
        method.load_state(state["extra"].get("method", {}))
    model = runtime.compiled(model)
    # every rank walks the same global batches; the method keeps this rank's slice. The last
    # partial batch is kept (as the reference's DataLoader does) unless --drop-last, or when it
    # has a single image (batch norm needs two) or does not divide among the processes
    batches = Batches(data, settings.batch_size, seed=settings.seed, drop_last=settings.drop_last,
                      ranks=ctx.world_size, min_last=2, require_full=True)
    # RCS (--coreset): 1 % held out to select on, the selection in the resume state
    coreset = Coreset(settings, len(data)) if getattr(settings, "coreset", None) else None
    if coreset is not None and state is not None:
        coreset.load_state(state["extra"].get("coreset", {}))
    begin_run(run, ctx, state)  # every check passed: the folder is created (or cleared) now
    encoder = run.artifact(ENCODER_FILE)
    # the lineage: the checkpoint the method started from (DeACL's teacher), if any
    parent = next((c.sha256 for c in method.inputs.values() if isinstance(c, Checkpoint)), None)
    config = {**settings.to_config(), "runtime": runtime.record()}  # what ran, in every encoder
    saved = {"note": f"the last saved encoder is {encoder}" if encoder.exists() else "no encoder was saved yet"}
    extra = {"runtime": config["runtime"], "inputs": input_digests(settings)}
    last = {"metrics": (run.read_metrics() or [{}])[-1] if start else {}}

    def end_epoch(done: int, metrics: dict) -> None:
        last["metrics"] = metrics
        if ctx.is_main:
            run.append_metrics(metrics)
            save(done, metrics)

    def save(done: int, metrics: dict) -> None:
        # the state first: a crash before the encoder is written leaves a run that --resume continues
        final = done == settings.epochs
        state_of = dict(epoch=done, total_epochs=settings.epochs, config=settings.to_config(),
                        extra={**extra, "method": method.state(), **({"coreset": coreset.state()} if coreset else {})})
        run.save_state(model, optimizer, **state_of, finished=False)
        if done % settings.save_every == 0 or final:
            save_model(encoder, method.export(model), kind="encoder", method=method.checkpoint_name, dataset=data.name,
                       eps=None if without_attack(settings) else method.eps, config=config,
                       metrics=metrics, parent=parent, rescue=final)
            saved["note"] = f"the last saved encoder is {encoder} (epoch {done})"
        if final:  # finished only once the encoder is on disk
            run.save_state(model, optimizer, **state_of)

    def start_epoch(epoch: int) -> None:
        method.start_epoch(epoch)
        if coreset is not None:
            coreset.start_epoch(epoch, method, model, data, batches, ctx)

    schedule = method.schedule()
    if ctx.is_main and 0 < settings.epochs <= getattr(schedule, "warmup_epochs", 0) and not start:
        reporter.warn(f"--epochs {settings.epochs}: the whole run is {settings.method}'s learning-rate warm-up, so it "
                      "ends at the peak learning rate without the cosine decay (pass --warmup-epochs 0, or more epochs)")
    loop = Loop(
        model=model, optimizer=optimizer, batches=batches, schedule=schedule, name="pretrain",
        step=lambda images, labels, indices, gen: method.step(model, images, indices, gen, ctx),
        seed=settings.seed, device=device, precision=precision, ctx=ctx, reporter=reporter,
        before_epoch=start_epoch, after_step=lambda: method.after_step(model), last_good=lambda: saved["note"],
    )
    if ctx.is_main:
        what = f"resuming after epoch {start}" if start else "training"
        reporter.log(
            f"{what}: {settings.method} on {data.name} ({len(data)} images), {settings.arch}, "
            f"{plural(settings.epochs, 'epoch')} of {plural(len(batches), 'step')}, batch {settings.batch_size}, "
            f"{runtime.describe()} -> {run.path}"
        )
        if coreset is not None:
            reporter.log(coreset.describe(settings.epochs))
    model.train()
    loop.run(start, settings.epochs, end_epoch)
    if start == settings.epochs and ctx.is_main:  # the last epoch's state was saved, its encoder not yet
        save(start, last["metrics"])
    shutdown(ctx)
    return RunResult(encoder, run.path, settings.epochs, last["metrics"], ctx.is_main, runtime=config["runtime"])
