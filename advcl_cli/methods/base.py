"""What a pretraining method is: its settings, its network, its step.

A method is one module with one subclass of ``Method``. Its ``Settings`` model (a subclass of
``TrainSettings``, usually made with ``settings.with_defaults`` to set the method's own learning
rate and so on, plus the method's options declared with ``settings.option``) is all the
configuration it has: the CLI shows those fields as flags in a panel of ``advcl pretrain --help``,
the TOML file reaches them in ``[pretrain]`` and ``[pretrain.<name>]``, ``ADVCL_*`` variables by
name, and the resolved values go into the checkpoint's ``config``.

The engine builds ``Method(settings, n_images=N, device=D, inputs=...)`` (``inputs`` holds the
files the settings name, read by the engine: a field declared with ``option(..., input="labels")``
arrives as a ``PseudoLabels``, one with ``input="checkpoint"`` as a ``Checkpoint``), builds the
network from ``model_config(arch)`` and hands it to ``init_model(model)`` (a method that starts
from other weights than the seeded ones loads them there), then builds the optimizer from
``optimizer(params)`` and the schedule from ``schedule()``, and per step calls ``step(model,
batch_uint8, indices, gen, ctx) -> (loss, terms)``, does backward, the gradient all-reduce and
the optimizer step, then ``after_step(model)``. ``start_epoch(epoch)`` runs before each
epoch; ``state()`` / ``load_state(tensors)`` carry a method's own tensors (a momentum encoder,
say) in the resume state; ``export(model)`` is the network the engine saves as the encoder (the
trained one, or e.g. DynACL's momentum encoder). Third-party methods register a ``Method`` subclass under the
``advcl.methods`` entry point group; everything a method author needs (this base, the settings
pieces, views, the PGD loop, losses, distributed helpers) is exported by ``advcl_cli.api``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, BeforeValidator, Field
from torch import Tensor

from ..device import memory_format, resolve_channels_last
from ..optim import WarmupCosine, build_optimizer
from ..settings import BatchSettings, BudgetSettings, Eps, defaults, option


@defaults(batch_size=Field(512, ge=2))  # a contrastive batch needs pairs
class TrainSettings(BatchSettings):
    """The optimiser and schedule settings every method has (each sets its own defaults)."""

    epochs: int = option(1000, "Epochs.", ge=1)
    optimizer: Annotated[Literal["sgd", "lars"], BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = option(
        "sgd", "sgd, or lars (layer-wise adaptive rate scaling as the ACL code defines it).")
    lr: float = option(0.5, "Peak learning rate.", gt=0)
    momentum: float = option(0.9, "Momentum.", ge=0)
    weight_decay: float = option(1e-4, "Weight decay (LARS: on every parameter).", ge=0)
    lars_eta: float = option(1e-3, "LARS trust coefficient (with --optimizer lars).", gt=0)
    warmup_epochs: int | None = option(None, "Linear warm-up epochs (rule: 10 when the batch is over 256, else 0).", ge=0)


class PGDSettings(BudgetSettings):
    """The training attack of the robust methods: L-inf PGD with a uniform random start."""

    pgd_steps: int = option(5, "PGD steps of the training attack.", ge=0)
    pgd_step_size: Eps = option(2 / 255, "PGD step size.", metavar="EPS")


class Method:
    """Base class of the pretraining methods; see the module's docstring for the contract."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `advcl pretrain --help`
    Settings: ClassVar[type[TrainSettings]] = TrainSettings
    # How its encoders are finetuned (the RobustSSL protocol's per-method settings): per scheme
    # (slf, alf, aff) the values that differ from engine.finetune.PROTOCOL: epochs, batch_size,
    # lr, milestones, and for aff dual_bn (clean images through "normal", adversarial through
    # "pgd", "pgd" kept at the end). A value is a number (a list, a flag) or a table by where
    # the encoder is finetuned: {"cifar10->stl10": a transfer, "stl10": a target dataset, "*":
    # otherwise}, looked up in that order (engine.finetune.protocol).
    finetune_protocol: ClassVar[dict[str, dict[str, Any]]] = {}
    aliases: ClassVar[tuple[str, ...]] = ()  # other method names of its checkpoints (imported variants)
    alias_protocols: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}  # an alias finetuned differently

    def __init__(self, settings, *, n_images: int, device: torch.device | str = "cpu", inputs: dict[str, Any] | None = None):
        self.settings = settings
        self.n_images = n_images
        self.device = torch.device(device)
        # the memory format of the networks a method keeps besides the model (a teacher, a
        # momentum encoder): the model's, as --channels-last resolves on this device
        self.channels_last = resolve_channels_last(getattr(settings, "channels_last", "auto"), self.device)
        self.inputs = inputs or {}
        self.notes: list[str] = []  # lines the engine shows on stderr

    def place(self, net: torch.nn.Module) -> torch.nn.Module:
        """A network the method keeps (a teacher, a momentum encoder) on its device, in the
        memory format the model computes in."""
        return net.to(self.device, memory_format=memory_format(self.channels_last))

    @property
    def checkpoint_name(self) -> str:
        """The method recorded in its checkpoints (a variant may say more, e.g. "dynacl-air")."""
        return self.name

    @property
    def eps(self) -> float | None:
        """The attack budget of a robust method (None: not adversarially trained)."""
        return getattr(self.settings, "eps", None)

    def model_config(self, arch: str) -> dict:
        """ModelConfig fields of the network this method trains."""
        raise NotImplementedError

    def step(self, model, batch: Tensor, indices: Tensor, gen: torch.Generator, ctx) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one global batch (uint8 images, their dataset indices) and its parts."""
        raise NotImplementedError

    def optimizer(self, params) -> torch.optim.Optimizer:
        s = self.settings
        return build_optimizer(s.optimizer, params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, eta=s.lars_eta)

    def schedule(self):
        """The learning-rate schedule: by default AdvCL's warm-up + cosine per epoch (warm-up
        for 10 epochs when the batch exceeds 256, the paper's rule). It needs only
        ``TrainSettings``: settings that extend ``CosineSettings`` also set where the warm-up
        starts and where the cosine ends, others get its defaults."""
        s = self.settings
        cosine = s if isinstance(s, CosineSettings) else CosineSettings()
        warmup = s.warmup_epochs if s.warmup_epochs is not None else (10 if s.batch_size > 256 else 0)
        return WarmupCosine(base_lr=s.lr, epochs=s.epochs, warmup_epochs=min(warmup, s.epochs),
                            warmup_from=cosine.warmup_from, min_ratio=cosine.min_lr_ratio)

    def init_model(self, model) -> None:
        """Called once on the freshly built network (seeded initial weights), before the
        optimizer exists and before a resume loads its state; a method that starts from other
        weights (DeACL: its teacher's) loads them here."""

    def start_epoch(self, epoch: int) -> None:
        """Called before every epoch (0-based), also after a resume."""

    def after_step(self, model) -> None:
        """Called after every optimizer step."""

    def export(self, model):
        """The network saved as the run's encoder (default: the trained ``model``)."""
        return model

    def state(self) -> dict[str, Tensor]:
        """The method's own tensors to keep in the resume state."""
        return {}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """Restore what ``state`` returned."""


class ContrastiveSettings(BaseModel):
    """The SupCon / NT-Xent temperature (SupContrast's loss scaling included)."""

    temperature: float = option(0.5, "Contrastive temperature.", gt=0)
    base_temperature: float = option(0.07, "The loss is scaled by temperature / base-temperature (SupContrast's loss).", gt=0)


class CosineSettings(BaseModel):
    """AdvCL's warm-up + cosine schedule (``Method.schedule``'s default)."""

    warmup_from: float = option(0.01, "Learning rate at the start of the warm-up.", ge=0)
    min_lr_ratio: float = option(1e-3, "The cosine decays to lr times this.", ge=0)


class AInfoNCESettings(BaseModel):
    """A-InfoNCE (Yu et al., ECCV 2022) on a method's contrastive loss, off by default; an unset
    weight or tau_plus takes the authors' script value for the method and variant."""

    a_infonce: Literal["off", "ip", "hn", "iphn"] = option(
        "off", "A-InfoNCE: the adversarial view as an inferior positive (ip), adversarial views as hard negatives "
        "(hn), or both (iphn); checkpoints record a-infonce (advcl) or rocl-a-infonce (rocl).")
    ip_weight: float | None = option(None, "A-InfoNCE: weight of the adversarial-clean pairs (unset: the authors' "
                                           "scripts: advcl 1.2 ip, 0.7 iphn, 1 hn; rocl 1).", ge=0)
    stpg_degree: float = option(0.2, "A-InfoNCE ip: the stop-gradient degree (0: no gradient to the clean view).", ge=0, le=1)
    tau_plus: float | None = option(None, "A-InfoNCE hn: the positive-class prior (unset: advcl 0.12 hn, 0.1 iphn; "
                                          "rocl 0.12).", ge=0, lt=1)
    hn_beta: float = option(1.0, "A-InfoNCE hn: hardness concentration beta.", ge=0)
