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
from ..distributed import prepare_model
from ..report import Reporter, plural
from .lifecycle import Lifecycle
from .monitor import monitor_of
from .run import RunDir, RunResult, holds_run_folder, load_split

ENCODER_FILE = "encoder.safetensors"


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


class EncoderSaver:
    """Pretraining's end of epoch on rank 0: the metrics line, the resume state, and every
    ``save_every`` epochs and at the end the encoder (the state first, so a crash before the
    encoder is written leaves a run that --resume continues; "finished" only once the last
    encoder is on disk). ``note`` says where the last good encoder is, for the NaN message."""

    def __init__(self, settings, life: Lifecycle, method, model, optimizer, data_name: str):
        self.settings, self.life, self.method, self.model, self.optimizer = settings, life, method, model, optimizer
        self.encoder = life.run.artifact(ENCODER_FILE)
        self.note = f"the last saved encoder is {self.encoder}" if self.encoder.exists() else "no encoder was saved yet"
        # the lineage: the checkpoint the method started from (DeACL's teacher), if any
        parent = next((c.sha256 for c in method.inputs.values() if isinstance(c, Checkpoint)), None)
        config = {**life.config, "runtime": life.runtime.record()}  # what ran, in every encoder
        self.encoder_args = dict(kind="encoder", method=method.checkpoint_name, dataset=data_name,
                                 eps=None if without_attack(settings) else method.eps, config=config, parent=parent)
        self.extra = {"runtime": config["runtime"], "inputs": input_digests(settings)}
        self.monitor = None  # the kNN monitor of --monitor-every (``engine.monitor``)
        self.coreset = None  # RCS's coreset of --coreset (``methods.rcs``): its selection is in the state

    def end_epoch(self, done: int, metrics: dict) -> None:
        if self.life.is_main:
            metrics.update(self.monitor(self.method.export(self.model), done) if self.monitor else {})
            self.life.run.append_metrics(metrics)
            self.save(done, metrics)

    def state_of(self, done: int) -> dict:
        """The resume state after ``done`` epochs (``RunDir.save_state``'s arguments)."""
        return dict(model=self.model, optimizer=self.optimizer, epoch=done, total_epochs=self.settings.epochs,
                    config=self.life.config, extra={**self.extra, "method": self.method.state(),
                                                    **({"coreset": self.coreset.state()} if self.coreset else {})})

    def save(self, done: int, metrics: dict) -> None:
        final = done == self.settings.epochs
        state = self.state_of(done)
        self.life.run.save_state(**state, finished=False)
        if done % self.settings.save_every == 0 or final:
            save_model(self.encoder, self.method.export(self.model), metrics=metrics, rescue=final, **self.encoder_args)
            self.note = f"the last saved encoder is {self.encoder} (epoch {done})"
        if final:  # finished only once the encoder is on disk
            self.life.run.save_state(**state)


def check_paths(settings, run: RunDir) -> None:
    """Before any work: known dataset, valid input files, none of them written by the run folder."""
    check_settings(settings)
    for name, (_, path) in input_fields(settings).items():
        if run.holds(path):
            raise UsageError(f"--{name.replace('_', '-')} {path} is a file the run folder {run.path} writes",
                             "choose another --out, or move the file")


def build_model(settings, method, life: Lifecycle):
    """The method's network, seeded, with its initial weights, placed and prepared for the
    process group, its optimizer, restored on resume (the method's state too), then compiled."""
    torch.manual_seed(settings.seed)
    model = create_model(settings.arch, **method.model_config(settings.arch)).to(life.device)
    method.init_model(model)  # the method's initial weights (DeACL: its teacher's), before anything copies them
    model = life.runtime.place(model)
    # before the optimizer exists: with several processes it swaps the BN modules (new parameters)
    model = prepare_model(model, life.ctx)
    optimizer = method.optimizer(model.parameters())
    life.restore(model, optimizer)
    if life.state is not None:
        method.load_state(life.extra.get("method", {}))
    return life.runtime.compiled(model), optimizer


def warn_warmup_only(settings, schedule, life: Lifecycle) -> None:
    if 0 < settings.epochs <= getattr(schedule, "warmup_epochs", 0) and not life.start:
        life.reporter.warn(f"--epochs {settings.epochs}: the whole run is {settings.method}'s learning-rate warm-up, so "
                           "it ends at the peak learning rate without the cosine decay (pass --warmup-epochs 0, or more "
                           "epochs)")


@holds_run_folder
def pretrain(settings, reporter: Reporter | None = None, *, resume: bool | str | None = None, force: bool = False) -> RunResult:
    run = RunDir(settings.out or default_run_dir(settings), artifacts=(ENCODER_FILE,), verb="pretrain")
    check_paths(settings, run)
    with Lifecycle(settings, run, reporter, resume=resume, force=force) as life:
        if without_attack(settings):
            life.reporter.warn(f"--pgd-steps 0: {settings.method} trains without adversarial examples, so the encoder "
                               "will not be robust and records no eps (use --pgd-steps 1 or more, the paper uses 5)")
        if life.state is not None:
            check_inputs_unchanged(settings, life.extra.get("inputs", {}))
        if life.finished():
            return life.finished_result(ENCODER_FILE)
        data = load_split(
            settings.dataset, "train", life.ctx, data_dir=settings.data_dir, download=settings.download,
            limit=settings.limit, image_size=settings.image_size,
        ).to(life.device)
        method = make_method(settings, len(data), life.device)
        monitor = monitor_of(settings, data, None if without_attack(settings) else method.eps, life.ctx,
                             life.runtime.precision)
        for note in method.notes:
            life.reporter.warn(note)
        model, optimizer = build_model(settings, method, life)
        # every rank walks the same global batches; the method keeps this rank's slice. The last
        # partial batch is kept (as the reference's DataLoader does) unless --drop-last, or when it
        # has a single image (batch norm needs two) or does not divide among the processes
        batches = Batches(data, settings.batch_size, seed=settings.seed, drop_last=settings.drop_last,
                          ranks=life.ctx.world_size, min_last=2, require_full=True)
        coreset = Coreset(settings, len(data)) if getattr(settings, "coreset", None) else None
        if coreset is not None and life.state is not None:
            coreset.load_state(life.extra.get("coreset", {}))
        life.begin()
        saver = EncoderSaver(settings, life, method, model, optimizer, data.name)
        saver.monitor, saver.coreset = monitor, coreset

        def start_epoch(epoch: int) -> None:
            method.start_epoch(epoch)
            if coreset is not None:
                coreset.start_epoch(epoch, method, model, data, batches, life.ctx)
        schedule = method.schedule()
        warn_warmup_only(settings, schedule, life)
        loop = life.loop(
            model=model, optimizer=optimizer, batches=batches, schedule=schedule, name="pretrain",
            step=lambda images, labels, indices, gen: method.step(model, images, indices, gen, life.ctx),
            before_epoch=start_epoch, after_step=lambda: method.after_step(model), last_good=lambda: saver.note,
        )
        life.banner("training", f"{settings.method} on {data.name} ({len(data)} images), {settings.arch}, "
                                f"{plural(settings.epochs, 'epoch')} of {plural(len(batches), 'step')}, "
                                f"batch {settings.batch_size}")
        if coreset is not None:
            life.reporter.log(coreset.describe(settings.epochs))
        model.train()
        life.train(loop, 0, settings.epochs, saver.end_epoch, saver.state_of)
        if life.start == settings.epochs and life.is_main:  # the last epoch's state was saved, its encoder not yet
            saver.save(life.start, life.metrics)
    return life.result(saver.encoder, settings.epochs)
