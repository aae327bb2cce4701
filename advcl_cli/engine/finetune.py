"""Robust finetuning of a pretrained encoder: the SLF, ALF and AFF schemes.

Schemes (the protocol of the AdvCL paper and the RobustSSL benchmark), one object each with
its model and its step:

- ``slf`` standard linear finetuning: the encoder is frozen and stays in eval mode; a linear
  head is trained with cross-entropy on clean images.
- ``alf`` adversarial linear finetuning: encoder frozen, eval mode; the head is trained on
  PGD-10 examples (eps 8/255, step 2/255, uniform random start) made against the whole model.
- ``aff`` adversarial full finetuning: the whole network trains with TRADES (beta 6): the
  adversary (10 steps of 2/255 from ``x + 0.001 N(0, 1)`` on the summed KL) runs with the model
  in eval mode, then the clean and adversarial forward passes run in train mode and the loss is
  ``CE(f(x), y) + beta * KL_sum(f(x_adv) || f(x)) / B``. With ``dual_bn`` (the ACL family)
  the network keeps the encoder's "normal" and "pgd" BN sets: clean images go through
  "normal", adversarial ones through "pgd", and the classifier keeps "pgd" at the end.

Facts matched from the reference finetuning code (RobustSSL ``utils.py``, AdvCL
``finetuning_advCL_SLF.py``): training images get RandomCrop(padding 4) + horizontal flip,
test images none; SGD with momentum 0.9 and weight decay 2e-4 on the trained parameters only
(the head for SLF/ALF); the rate is multiplied by 0.1 at each milestone epoch.

Defaults (``protocol``): the benchmark's (``PROTOCOL``: 25 epochs, decay at 15 and 20;
SLF/ALF batch 512, lr 0.01; AFF batch 128, lr 0.1), overridden by the encoder's method
(``Method.finetune_protocol``: ACL's SLF/ALF decay at 10 and 20, its AFF 100 epochs, ...),
overridden by the settings given. Finetuning starts from the encoder's "pgd" BN set when it
has one, else its only set; a classifier checkpoint (e.g. from SLF) can be finetuned again.

No model selection on the test set: the last epoch is kept, or with ``val_fraction`` that part
of the training split is held out and the epoch with the best PGD-20 accuracy on it is kept.
At the end the kept model's clean and PGD-20 accuracy on the test split (``eval_limit`` first
images) go into the checkpoint's metrics as fractions: ``clean_acc``, ``pgd20_acc``, ``n_eval``
(with a note when it is near or below chance); the test split is read before training starts, so a
broken one stops the run before any epoch. The checkpoint's ``config`` also records the
dataset's class names (``classes``), which evaluation compares with the dataset it is given.

The run folder works as in pretraining (``engine.run``): ``classifier.safetensors``,
``state.safetensors`` after every epoch, ``metrics.jsonl``; ``resume`` continues it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..attacks import get_attack
from ..attacks.pgd import pgd, trades_adversary, trades_objective
from ..checkpoint import Checkpoint, load_checkpoint, save_model, unwrap
from ..data.augment import crop_flip_view
from ..data.batches import Batches
from ..data.registry import load_dataset
from ..errors import DataError, UsageError
from ..methods import method_for
from ..models import backbone_with_bn_set
from ..optim import MultiStep
from ..device import autocast, upcast
from ..distributed import local_slice, on_main, prepare_model
from .evaluate import class_names_differ, evaluate
from ..report import Reporter, plural
from .lifecycle import Lifecycle
from .run import RunDir, RunResult, check_derived, check_parent, holds_run_folder, load_split

CLASSIFIER_FILE = "classifier.safetensors"
PROTOCOL: dict[str, dict[str, Any]] = {  # the RobustSSL benchmark's defaults (REFERENCE.md)
    "slf": {"epochs": 25, "batch_size": 512, "lr": 0.01, "milestones": [15, 20]},
    "alf": {"epochs": 25, "batch_size": 512, "lr": 0.01, "milestones": [15, 20]},
    "aff": {"epochs": 25, "batch_size": 128, "lr": 0.1, "milestones": [15, 20], "dual_bn": False},
    # AutoLoRa.py --autolora: AFF's batch, 50 epochs, the rate from 0.1 set automatically, one BN set
    "autolora": {"epochs": 50, "batch_size": 128, "lr": 0.1, "milestones": [], "dual_bn": False},
}
FILLED = ("epochs", "batch_size", "lr", "milestones")


def protocol(method: str, scheme: str, dataset: str, source: str | None = None) -> dict[str, Any]:
    """The finetuning defaults for an encoder of ``method`` pretrained on ``source`` (None: on
    ``dataset``) and finetuned on ``dataset``: the benchmark's, then the method's own
    (``Method.finetune_protocol``, or its ``alias_protocols`` entry). A value given per place is
    looked up as "source->dataset" (a transfer), then "dataset", then "*"."""
    cls = method_for(method)
    own = cls.alias_protocols.get(str(method).strip().lower(), cls.finetune_protocol) if cls is not None else {}
    target = str(dataset).lower()
    places = [f"{str(source).lower()}->{target}"] if source is not None and str(source).lower() != target else []
    places += [target, "*"]
    values = {**PROTOCOL[scheme]}
    for key, value in own.get(scheme, {}).items():
        if isinstance(value, dict):
            value = next((value[p] for p in places if p in value), values.get(key))
        values[key] = value
    return values


def with_protocol(settings, method: str, dataset: str, source: str | None = None):
    """The settings with epochs, batch size, lr and milestones filled in from ``protocol``."""
    values = protocol(method, settings.scheme, dataset, source)
    fill = {k: values[k] for k in FILLED if getattr(settings, k) is None}
    return settings.model_copy(update=fill) if fill else settings


def default_run_dir(settings, parent: Checkpoint) -> Path:
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.dataset or parent.meta.dataset).strip("_")
    return Path("runs") / f"{parent.meta.method}-{settings.scheme}-{dataset}-{parent.sha256[:8]}"


# --- the schemes --------------------------------------------------------------------------------


class Scheme:
    """What a scheme trains and how one batch's loss is computed; ``frozen`` schemes train the
    head only. ``steps``/``step_size``/``eps``/``beta`` come from the settings. A scheme with
    state of its own between steps (AutoLoRa) also uses the hooks below ``final``."""

    name = ""
    frozen = True

    def __init__(self, settings, dual_bn: bool = False):
        self.s = settings
        self.dual_bn = dual_bn

    def bn_sets(self, sets: tuple[str, ...]) -> str | tuple[str, ...]:
        """The encoder's BN set(s) to keep while training."""
        if self.s.bn_set is not None:
            return self.s.bn_set
        return "pgd" if "pgd" in sets else sets[0]

    def loss(self, model, x, y, gen, precision, device):
        """(loss, logits) of one (local) batch of augmented [0, 1] images."""
        raise NotImplementedError

    def final(self, model):
        """The classifier to keep once training is over."""
        return model

    def _head_loss(self, model, x, y, precision, device):
        return head_loss(model, x, y, precision, device)

    def prepare(self, model):
        """The model to train, before the optimizer exists (AutoLoRa adds its branch)."""
        return model

    def begin(self, train, steps: int, precision, device):
        """The learning-rate schedule of a run on ``train`` (ImageData) with ``steps`` per epoch."""
        return MultiStep(self.s.lr, tuple(self.s.milestones))

    def start_epoch(self, model, epoch: int) -> None:
        """Before every epoch (0-based)."""

    def after_step(self, model) -> None:
        """After every optimizer step."""

    def end_epoch(self, model, done: int, robust_acc) -> None:
        """After epoch ``done`` (1-based); ``robust_acc()`` gives the validation PGD-20 accuracy."""

    def state(self) -> dict:
        """What a resumed run needs of the scheme (kept in the resume state)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what ``state`` returned."""


class SLF(Scheme):
    name = "slf"

    def loss(self, model, x, y, gen, precision, device):
        return self._head_loss(model, x, y, precision, device)


class ALF(Scheme):
    name = "alf"

    def loss(self, model, x, y, gen, precision, device):
        model.eval()
        with autocast(precision, device):
            x = pgd(model, x, y, self.s.eps, self.s.attack_steps, self.s.attack_step_size, gen=gen, norm=self.s.norm)
        return self._head_loss(model, x, y, precision, device)


class AFF(Scheme):
    name = "aff"
    frozen = False

    def bn_sets(self, sets):
        if self.dual_bn and self.s.bn_set is None and {"normal", "pgd"} <= set(sets):
            return ("normal", "pgd")
        return super().bn_sets(sets)

    def loss(self, model, x, y, gen, precision, device):
        sets = unwrap(model).config.bn_sets
        clean, adv = ("normal", "pgd") if sets == ("normal", "pgd") else (None, None)
        return trades_step(model, x, y, gen, precision, device, self.s, clean_bn=clean, adv_bn=adv)

    def final(self, model):
        net = unwrap(model)
        if net.config.bn_sets == ("normal", "pgd"):
            return _keep_set(net, "pgd")
        return model


class AutoLoRa(Scheme):
    """AFF with a LoRA branch, automatic loss weights and learning rate (``engine.autolora``)."""

    name = "autolora"
    frozen = False

    def prepare(self, model):
        from .autolora import LoRA

        model.lora = LoRA(model.backbone)
        return model

    def begin(self, train, steps, precision, device):
        from .autolora import AutoLoRaRun

        self.run, self.precision, self.device = AutoLoRaRun(self.s, train.images, train.labels, steps), precision, device
        return self.run.schedule

    def loss(self, model, x, y, gen, precision, device):
        from .autolora import adversary, autolora_loss

        with autocast(precision, device):
            x_adv = adversary(model, x, y, self.s, gen)
            model.train()
            return autolora_loss(model, x, y, x_adv, self.run.l1, self.run.l2)

    def start_epoch(self, model, epoch):
        self.run.start_epoch(epoch, model, self.precision, self.device)

    def after_step(self, model):
        self.run.after_step(model, self.precision, self.device)

    def end_epoch(self, model, done, robust_acc):
        self.run.end_epoch(model, done, robust_acc())

    def final(self, model):
        net = unwrap(model)
        return _keep_set(net, net.config.bn_sets[0])  # the backbone without its LoRA branch

    def state(self):
        return self.run.state()

    def load_state(self, state):
        self.run.load_state(state)


def head_loss(model, x, y, precision, device, bn: str | None = None):
    """(cross-entropy, logits) of the linear head on the frozen encoder's features (BN set
    ``bn``, default the model's first), the model in eval mode so its BN statistics never move."""
    model.eval()
    with torch.no_grad(), autocast(precision, device):
        feat = model.features(x, bn)
    with autocast(precision, device):
        logits = model.fc(upcast(feat))
    return F.cross_entropy(upcast(logits), y), logits


def trades_step(model, x, y, gen, precision, device, s, *, clean_bn: str | None = None, adv_bn: str | None = None,
                random_start: bool = True):
    """(TRADES loss, clean logits) of one batch: the adversary (``s.attack_steps`` steps of
    ``s.attack_step_size`` within ``s.eps``, from ``x + 0.001 N(0, 1)`` or, without
    ``random_start``, from ``x``) with the model in eval mode, then the clean (``clean_bn``) and
    adversarial (``adv_bn``) forward passes in train mode; beta ``s.trades_beta``."""
    model.eval()
    with autocast(precision, device):
        x_adv = trades_adversary(lambda z: model(z, adv_bn), x, s.eps, s.attack_steps, s.attack_step_size, gen=gen,
                                 natural=lambda z: model(z, clean_bn), random_start=random_start,
                                 norm=getattr(s, "norm", "linf"))  # LPAFT's settings have none: L-inf
    model.train()
    with autocast(precision, device):
        logits = model(x, clean_bn)
        return trades_objective(logits, model(x_adv, adv_bn), y, s.trades_beta), logits


def supervised_step(loss, ctx):
    """The ``Loop`` step of a supervised scheme: RandomCrop(padding 4) + flip of the global batch,
    this rank's slice of images and labels, ``loss(x, y, gen) -> (loss, logits)``; the training
    accuracy as a metric."""
    def step(images, labels, indices, gen):
        x, y = local_slice(crop_flip_view(images, gen), ctx), local_slice(labels, ctx)
        value, logits = loss(x, y, gen)
        return value, {"train_acc": (logits.argmax(1) == y).float().mean()}

    return step


def _keep_set(net, bn: str):
    """The dual-BN classifier as a single-BN one with set ``bn`` (its head kept)."""
    single = backbone_with_bn_set(net, bn, num_classes=net.config.num_classes)
    single.fc.load_state_dict(net.fc.state_dict())
    return single.to(next(net.parameters()).device)


SCHEMES = {cls.name: cls for cls in (SLF, ALF, AFF, AutoLoRa)}


def build_classifier(parent: Checkpoint, data, scheme: Scheme, reporter: Reporter | None = None):
    """The model to finetune for ``data`` (an ImageData, or its number of classes): the
    encoder's backbone (the scheme's BN set(s)) with a new linear head that starts at zero, as
    the RobustSSL benchmark's does (``fc.weight`` and ``fc.bias`` zeroed before finetuning); a
    classifier checkpoint as it is (its head kept, noted)."""
    num_classes = data if isinstance(data, int) else data.num_classes
    net = parent.build("cpu")
    if parent.meta.kind == "classifier":
        if net.config.num_classes != num_classes:
            raise DataError(
                f"the classifier {parent.path} has {net.config.num_classes} classes, the dataset {num_classes}",
                "finetune on a dataset with the same classes, or start from the encoder",
            )
        if reporter is not None:
            reporter.log(f"note: {parent.path} is a classifier: finetuning continues from it, its head included")
            if not isinstance(data, int):
                note = class_names_differ(parent, data)
                if note:
                    reporter.warn(note)
        return net
    sets = net.config.bn_sets
    keep = scheme.bn_sets(sets)
    if scheme.s.bn_set is None and keep == sets[0] and len(sets) > 1 and reporter is not None:
        reporter.warn(f"the encoder has no 'pgd' batch-norm set; starting from '{keep}'")
    model = backbone_with_bn_set(net, keep, num_classes=num_classes)
    with torch.no_grad():  # the benchmark's start: fc.weight and fc.bias set to 0 for every scheme
        model.fc.weight.zero_()
        model.fc.bias.zero_()
    return model


def chance_note(acc: float, num_classes: int, epochs: int, protocol_epochs: int, pretrain_epochs=None) -> str | None:
    """A note when the test accuracy is within 5 points of chance (1/classes): after a short run
    that is what to expect, and people should not read it as a broken tool."""
    chance = 1 / max(num_classes, 1)
    if acc > chance + 0.05:
        return None
    said = f"note: the test clean accuracy {acc:.1%} is near or below chance ({chance:.1%} for {num_classes} classes)"
    pretrained = f", from an encoder pretrained for {plural(pretrain_epochs, 'epoch')}" if isinstance(pretrain_epochs, int) else ""
    if epochs < protocol_epochs or (isinstance(pretrain_epochs, int) and pretrain_epochs < 100):
        return (f"{said}: expected of a short run like this one ({plural(epochs, 'epoch')} of finetuning{pretrained}); "
                f"train longer (the protocol finetunes {protocol_epochs} epochs, on encoders pretrained for hundreds)")
    return f"{said}: check the encoder (is it trained?) and the learning rate"


# --- the engine ---------------------------------------------------------------------------------


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


def load_splits(settings, dataset: str, life: Lifecycle):
    """(full training split, test split or None, train, validation or None), train and validation
    on the device. The test split of the final evaluation is read now, so that a broken one stops
    the run before it trains (rank 0 evaluates; its failure reaches every rank)."""
    load = dict(data_dir=settings.data_dir, download=settings.download, image_size=settings.image_size)
    full = load_split(dataset, "train", life.ctx, limit=settings.limit, **load)
    test = None
    if settings.eval_limit != 0:  # --eval-limit 0: no final evaluation
        test = on_main(lambda: load_dataset(dataset, "test", limit=settings.eval_limit, **load), life.ctx)
    train, val = split_validation(full, settings.val_fraction, settings.seed)
    return full, test, train.to(life.device), (val.to(life.device) if val is not None else None)


def build_finetuning(settings, parent: Checkpoint, full, scheme: Scheme, life: Lifecycle):
    """The classifier (frozen backbone for SLF/ALF) and its SGD, restored on resume, compiled."""
    if scheme.name == "autolora" and life.ctx.enabled:
        raise UsageError("--scheme autolora runs in one process (its learning rate follows rank 0's validation)",
                         "run it without torchrun")
    torch.manual_seed(settings.seed)
    model = life.runtime.place(scheme.prepare(build_classifier(parent, full, scheme, life.reporter)))
    if scheme.frozen:
        model.backbone.requires_grad_(False)
    else:  # before the optimizer exists: with several processes it swaps the BN modules
        model = prepare_model(model, life.ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    life.restore(model, optimizer)
    return life.runtime.compiled(model), optimizer


class Finetuning:
    """Finetuning's end of epoch (rank 0: the validation pick, the metrics line, the resume state)
    and its end (the kept model evaluated on the test split and saved)."""

    def __init__(self, settings, parent: Checkpoint, scheme: Scheme, life: Lifecycle, model, optimizer, full, train, val,
                 test, places: tuple[str, str | None]):
        self.s, self.parent, self.scheme, self.life = settings, parent, scheme, life
        self.model, self.optimizer, self.train, self.val, self.test = model, optimizer, train, val, test
        self.places = places  # (the dataset finetuned on, the one the encoder was pretrained on), for the protocol
        self.out_file = life.run.artifact(CLASSIFIER_FILE)
        self.extra = dict(life.extra) if life.state is not None else {"parent": parent.sha256}
        self.extra["runtime"] = life.runtime.record()
        self.pgd20 = get_attack("pgd20", settings.norm)  # the final and validation PGD-20, in the training's norm
        # the class names go into the classifier's metadata, so evaluation can tell a dataset with others
        self.save_args = dict(kind="classifier", method=parent.meta.method, dataset=full.name, eps=settings.eps,
                              config={**life.config, "classes": full.classes, "runtime": self.extra["runtime"]},
                              parent=parent.sha256)

    def evaluate(self, model, data, reporter=None) -> dict:
        return evaluate(model, data, [self.pgd20], [self.s.eps], device=self.life.device, reporter=reporter,
                        seed=self.s.seed, channels_last=self.life.runtime.channels_last)

    def end_epoch(self, done: int, metrics: dict) -> None:
        self.model.eval()
        if not self.life.is_main:
            return
        if self.val is not None:
            self.select(done, metrics)
        # AutoLoRa's learning rate: PGD-20 on the held-out split, else on the training split (the authors')
        self.scheme.end_epoch(self.model, done, lambda: metrics["val_pgd20_acc"] if self.val is not None else self.evaluate(
            self.scheme.final(self.model), self.train)["robust"][0]["robust_acc"])
        self.life.run.append_metrics(metrics)
        self.life.run.save_state(**self.state_of(done))

    def state_of(self, done: int) -> dict:
        """The resume state after ``done`` epochs (``RunDir.save_state``'s arguments)."""
        own = self.scheme.state()  # AutoLoRa's learning rate and best state
        return dict(model=self.model, optimizer=self.optimizer, epoch=done, total_epochs=self.s.epochs,
                    config=self.life.config, extra={**self.extra, **({"scheme": own} if own else {})})

    def select(self, done: int, metrics: dict) -> None:
        """The held-out split's clean and PGD-20 accuracy; the best epoch's classifier is saved."""
        res = self.evaluate(self.scheme.final(self.model), self.val)
        metrics.update(val_clean_acc=res["clean_acc"], val_pgd20_acc=res["robust"][0]["robust_acc"])
        self.life.reporter.log(f"epoch {done}: validation clean {res['clean_acc']:.2%}, PGD-20 {metrics['val_pgd20_acc']:.2%}")
        if metrics["val_pgd20_acc"] > self.extra.get("best_val_pgd20_acc", -1.0):
            self.extra.update(best_val_pgd20_acc=metrics["val_pgd20_acc"], best_epoch=done,
                              best_val_clean_acc=res["clean_acc"])
            save_model(self.out_file, self.scheme.final(self.model), metrics=metrics, **self.save_args)

    def finish(self) -> dict:
        """Rank 0, once training is over: the kept model (the best epoch on the held-out split, else
        the last one) evaluated on the test split, saved, and marked final in the state."""
        s, val, reporter = self.s, self.val, self.life.reporter
        kept = self.scheme.final(self.model)
        if val is not None:
            kept = load_checkpoint(self.out_file).build(self.life.device)
            reporter.log(f"keeping epoch {self.extra['best_epoch']} (best PGD-20 accuracy on the held-out split)")
        final = {"epoch": self.extra.get("best_epoch", s.epochs), "norm": s.norm,
                 "selection": "best val PGD-20" if val is not None else "last epoch"}
        if self.test is not None:
            final = {**self.test_metrics(kept), **final}
        else:
            reporter.log("no final evaluation (--eval-limit 0): `advcl eval` measures the classifier")
        if val is not None:
            final.update(val_clean_acc=self.extra["best_val_clean_acc"], val_pgd20_acc=self.extra["best_val_pgd20_acc"])
        save_model(self.out_file, kept, metrics=final, rescue=True, **self.save_args)
        self.extra["final"] = final
        self.life.run.save_state(**self.state_of(s.epochs))
        return final

    def test_metrics(self, kept) -> dict:
        """The kept model's clean and PGD-20 accuracy on the test split (a note when near chance)."""
        res = self.evaluate(kept, self.test, self.life.reporter)
        note = chance_note(res["clean_acc"], self.test.num_classes, self.s.epochs,
                           protocol(self.parent.meta.method, self.scheme.name, *self.places)["epochs"],
                           self.parent.meta.config.get("epochs"))
        if note:
            self.life.reporter.log(note)
        return {"clean_acc": res["clean_acc"], "pgd20_acc": res["robust"][0]["robust_acc"], "n_eval": res["n"],
                "eps": self.s.eps, "flags": res["flags"]}


@holds_run_folder
def finetune(settings, parent: Checkpoint, reporter: Reporter | None = None, *, resume: bool | str | None = None,
             force: bool = False) -> RunResult:
    """Finetune ``parent`` (an encoder or classifier checkpoint) with ``settings.scheme``."""
    dataset = settings.dataset or parent.meta.dataset
    source = parent.meta.dataset
    settings = with_protocol(settings, parent.meta.method, dataset, source)
    dual_bn = bool(protocol(parent.meta.method, settings.scheme, dataset, source).get("dual_bn"))
    scheme = SCHEMES[settings.scheme](settings, dual_bn=dual_bn)
    run = RunDir(settings.out or default_run_dir(settings, parent), artifacts=(CLASSIFIER_FILE,), verb="finetune")
    check_derived(run, parent, dataset, "finetunes")
    with Lifecycle(settings, run, reporter, resume=resume, force=force) as life:
        if life.state is not None:
            check_parent(life.state, parent.sha256, run, "finetunes")
        if life.finished(needs="final"):
            return life.finished_result(CLASSIFIER_FILE, life.extra.get("final", {}))
        full, test, train, val = load_splits(settings, dataset, life)
        model, optimizer = build_finetuning(settings, parent, full, scheme, life)
        # every rank walks the same global batches and keeps its slice; with several processes the
        # last partial batch is dropped so that every rank gets an equal share
        batches = Batches(train, settings.batch_size, seed=settings.seed, drop_last=life.ctx.enabled)
        schedule = scheme.begin(train, len(batches), life.runtime.precision, life.device)
        if life.state is not None:
            scheme.load_state(life.extra.get("scheme", {}))
        life.begin()
        job = Finetuning(settings, parent, scheme, life, model, optimizer, full, train, val, test, (dataset, source))
        loop = life.loop(
            model=model, optimizer=optimizer, batches=batches, schedule=schedule,
            step=supervised_step(lambda x, y, gen: scheme.loss(model, x, y, gen, life.runtime.precision, life.device),
                                 life.ctx),
            name=f"finetune {scheme.name}", last_good=lambda: f"the last good state is in {run.state_path}",
            before_epoch=lambda epoch: scheme.start_epoch(model, epoch), after_step=lambda: scheme.after_step(model),
        )
        held = f", {len(val)} held out for selection" if val is not None else ""
        life.banner("finetuning", f"{scheme.name.upper()} of {parent.path} on {full.name} ({len(train)} images{held}), "
                                  f"{plural(settings.epochs, 'epoch')} of {plural(len(batches), 'step')}, "
                                  f"batch {settings.batch_size}, lr {settings.lr}, "
                                  f"BN {'/'.join(unwrap(model).config.bn_sets)}")
        life.train(loop, 0, settings.epochs, job.end_epoch, job.state_of)
    # every rank left the process group together; rank 0 alone evaluates and saves
    if not life.is_main:
        return life.result(job.out_file, settings.epochs, {})
    return life.result(job.out_file, settings.epochs, job.finish())
