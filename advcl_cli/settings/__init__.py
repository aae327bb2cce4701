"""The settings models: one pydantic model per verb, and per pretraining method.

Every option is declared once, here (or in its method's file) with ``option(default, help)``:
the CLI builds its flags from these models (``cli/options.py``), ``settings.layering`` fills
them from the layers (defaults < TOML file < ``ADVCL_*`` environment < flags), and the
resolved model is stored in every checkpoint (``to_config``). A field's flag is its name with
dashes (``batch_size`` -> ``--batch-size``), its environment variable ``ADVCL_`` plus its name
in capitals (``ADVCL_BATCH_SIZE``) and its TOML key the name itself (``batch_size``): one
spelling everywhere.

Values parse the same way from every layer: a flag or an environment variable is a string,
a TOML value may be a string or a native value, and the validators below accept both (eps as
``8/255`` or ``0.031``; lists as ``2,10,50`` or a TOML list; choices in any letter case).
"""

from __future__ import annotations

import copy
import functools
import re
import typing
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return "ADVCL_" + field.upper()


def option(default: Any, help: str, *, short: str | None = None, metavar: str | None = None,
           flag: bool = True, input: str | None = None, aliases: tuple[str, ...] = (), record: bool = True,
           resume_may_change: bool = False, **constraints) -> Any:
    """A settings field with its help text; ``short`` adds a one-letter flag (``-d``),
    ``aliases`` other flag names (``--endpoint``), ``flag=False`` keeps it out of the command
    line (TOML and environment only), ``input`` marks a path the engine reads before it starts
    ("labels": a pseudo-label file, "checkpoint": a model file), ``record=False`` keeps it out of
    the configuration a run records (``to_config``: how a run starts, not what it computes),
    ``resume_may_change`` a setting that changes how a run runs, not what it computes (a resumed
    run may change it: ``SettingsModel.resume_may_change``)."""
    extra = {"short": short, "metavar": metavar, "flag": flag, "input": input, "aliases": list(aliases) or None,
             "record": None if record else False, "resume_may_change": resume_may_change or None}
    return Field(default, description=help, json_schema_extra={k: v for k, v in extra.items() if v is not None},
                 **constraints)


# --- value types that parse the same from a flag, the environment and the TOML file ----------


def parse_eps(value: Any) -> float:
    """``8/255``, ``0.031`` or a number -> float in (0, 1]."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"'{value}' is not a number or a fraction like 8/255") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number or a fraction like 8/255")
    value = float(value)
    if not 0 < value <= 1:
        raise ValueError(f"eps must be in (0, 1], got {value:g} (pixels are in [0, 1]; try 8/255)")
    return value


def format_eps(eps: float) -> str:
    """The inverse of ``parse_eps`` for people: 8/255 for multiples of 1/255 below 1, else the number
    (with enough digits that it does not read as 0)."""
    k = eps * 255
    return f"{round(k)}/255" if 1 <= round(k) < 255 and abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def _items(value: Any) -> list:
    """A list from a comma-separated string, a list (whose strings may hold commas too) or one
    value; empty items are dropped."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for v in value:
        out += [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else [v]
    return out


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


def parse_eps_list(value: Any) -> list[float]:
    """``2/255,4/255,8/255`` (or a list, or one value) -> at least one eps, each once."""
    values = _items(value)
    if not values:
        raise ValueError("give at least one eps, e.g. 8/255 or 2/255,4/255,8/255")
    return _unique([parse_eps(v) for v in values])


def _whole(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"'{value}' is not a whole number") from None


def parse_int_list(value: Any) -> list[int]:
    """``2,10,50`` (or a list, or one value) -> whole numbers, each once."""
    return _unique([_whole(v) for v in _items(value)])


def parse_epoch_list(value: Any) -> list[int]:
    """``10,20`` -> epoch numbers (1 or more), each once, in increasing order."""
    epochs = sorted(parse_int_list(value))
    if epochs and epochs[0] < 1:
        raise ValueError(f"epoch {epochs[0]} is not an epoch number (they start at 1)")
    return epochs


def parse_name_list(value: Any) -> list[str]:
    """``pgd20,fgsm`` (or a list, repeated flags) -> names, each once, in lower case."""
    return _unique([str(v).strip().lower() for v in _items(value)])


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def parse_url(value: Any) -> Any:
    """An http(s) URL with a host (a Hub endpoint or mirror), without a trailing slash."""
    if value is None:
        return None
    text = str(value).strip()
    if not re.match(r"^https?://[^/\s:]+(:\d+)?(/\S*)?$", text):
        raise ValueError(f"'{text}' is not an http(s) URL such as https://huggingface.co")
    return text.rstrip("/")


Eps = Annotated[float, BeforeValidator(parse_eps)]
IntList = Annotated[list[int], BeforeValidator(parse_int_list)]
EpochList = Annotated[list[int], BeforeValidator(parse_epoch_list)]
NameList = Annotated[list[str], BeforeValidator(parse_name_list)]
Name = Annotated[str, BeforeValidator(_lower)]  # case-insensitive names (methods, schemes)
Device = Annotated[Literal["auto", "cpu", "cuda"], BeforeValidator(_lower)]
Precision = Annotated[Literal["auto", "bf16", "fp32"], BeforeValidator(_lower)]
ChannelsLast = Annotated[Literal["auto", "on", "off"], BeforeValidator(_lower)]
Resume = Annotated[Literal["off", "on", "auto"], BeforeValidator(_lower)]
Norm = Annotated[Literal["linf", "l2"], BeforeValidator(lambda v: _lower(v).replace("-", "") if isinstance(v, str) else v)]
Scheme = Literal["slf", "alf", "aff", "autolora"]  # the finetuning schemes: their one list
SCHEME_NAMES: tuple[str, ...] = typing.get_args(Scheme)
L2_EPS = 0.5  # the L2 budget of CIFAR-sized images (RobustBench's L2 leaderboard)


# --- the models ------------------------------------------------------------------------------


FLOAT32_MAX = 3.4028234663852886e38


class CheckedModel(BaseModel):
    """The rules every settings model shares: unknown keys refused, defaults validated too,
    numbers finite and within float32 (training computes in it), no empty path ("" would be
    the current folder), no true/false where a number goes (as a flag or a variable refuses it)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_values(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        types = (annotation, *typing.get_args(annotation))
        if isinstance(value, str) and not value.strip() and Path in types:
            raise ValueError("the path is empty; give a file or folder name")
        if isinstance(value, str) and not value.strip() and not any(typing.get_origin(t) is list for t in types):
            raise ValueError("the value is empty")
        if isinstance(value, bool) and bool not in types:  # TOML's true is not the number 1
            raise ValueError("true and false are only for on/off settings")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _within_float32(cls, value: Any) -> Any:
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise ValueError(f"{value:g} is beyond float32 (at most 3.4e38)")
        return value


class SettingsModel(CheckedModel):
    """A verb's settings; ``section`` is the verb's table in the TOML file."""

    section: ClassVar[str] = ""

    def to_config(self) -> dict[str, Any]:
        """JSON-ready resolved configuration, for checkpoint metadata."""
        unrecorded = {k for k, f in type(self).model_fields.items() if (f.json_schema_extra or {}).get("record") is False}
        return self.model_dump(mode="json", exclude=unrecorded)

    @classmethod
    def resume_may_change(cls) -> set[str]:
        """The settings a resumed run may change: those marked ``option(..., resume_may_change=True)``."""
        return {name for name, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("resume_may_change")}


class Settings(SettingsModel):
    """Fields every verb that computes shares."""

    data_dir: Path | None = option(None, "Where datasets live (default: $ADVCL_DATA_DIR or ~/.cache/advcl/data).",
                                   resume_may_change=True)
    device: Device = option("auto", "auto (a GPU when there is one), cpu or cuda.", resume_may_change=True)
    seed: int = option(0, "Random seed.", ge=0, le=2**32 - 1)


class DatasetNameSettings(CheckedModel):
    """The dataset: of the verbs that load images (each verb's help says whose it is by default),
    and of the files the imports write (their metadata)."""

    dataset: str | None = option(None, "cifar10, cifar100, stl10, digits (offline) or imagefolder:PATH (without a "
                                       "default shown: the checkpoint's).", short="-d")


class DatasetSettings(Settings, DatasetNameSettings):
    """The dataset options of the verbs that load images."""

    image_size: int | None = option(None, "Resize images to this square size.", ge=8, le=1024)
    download: bool = option(True, "Download a missing dataset.", flag=False, resume_may_change=True)


class DataSettings(DatasetSettings):
    """The dataset options of the verbs that load a whole split (``limit``: of the split they train on,
    else of the test split)."""

    limit: int | None = option(None, "Use only the first N images (smoke runs).", ge=1)


class BatchSettings(CheckedModel):
    """The batch of the verbs that load images in batches."""

    batch_size: int | None = option(None, "Images per batch; over every process when several run together "
                                          "(without a default shown: the protocol's).", short="-b", ge=1)


class BudgetSettings(CheckedModel):
    """The attack budget of the verbs that attack."""

    eps: Eps = option(8 / 255, "Attack budget under the threat model, as 8/255 or 0.031 (0.5 under --norm l2).",
                      metavar="EPS")


class TrainingAttackSettings(BudgetSettings):
    """The PGD attack a finetuning-style verb trains against (finetune's alf and aff, lpaft's TRADES)."""

    attack_steps: int = option(10, "PGD steps of the training attack.", ge=1)
    attack_step_size: Eps = option(2 / 255, "Step size of the training attack (eps/4 under --norm l2).", metavar="EPS")
    trades_beta: float = option(6.0, "TRADES beta (the weight of its robust term).", ge=0)


class OutputSettings(CheckedModel):
    """Where a verb writes: its run folder or its output file (each verb's help names its default)."""

    out: Path | None = option(None, "Where to write: the run folder, or the output file (default: see above).", short="-o",
                              resume_may_change=True)


def with_defaults(base: type[BaseModel], name: str, **defaults: Any) -> type[BaseModel]:
    """A subclass of ``base`` whose fields keep their help and constraints but start at other
    defaults (a method's own learning rate, say); a ``Field(default, ge=...)`` value also
    replaces the constraints it names."""
    fields = {}
    for key, value in defaults.items():
        if key not in base.model_fields:
            raise TypeError(f"{base.__name__} has no field {key!r}")
        if isinstance(value, FieldInfo):
            info = FieldInfo.merge_field_infos(base.model_fields[key], value)
        else:
            info = copy.copy(base.model_fields[key])
            info.default = value
        fields[key] = (base.model_fields[key].annotation, info)
    return create_model(name, __base__=base, **fields)


def defaults(**values: Any):
    """A class decorator: the model with other defaults for fields it takes from a group
    (``with_defaults``), its name and everything else kept."""
    return lambda cls: with_defaults(cls, cls.__name__, **values)


def several(name: str, parse, metavar: str):
    """A class decorator: the model whose field ``name``, declared for one value in a group,
    takes a list (``parse``: a value, a comma-separated string or a list -> the list), its help
    kept and its default the one value in a list (``eval --eps 2/255,8/255``)."""

    def wrap(cls: type[BaseModel]) -> type[BaseModel]:
        info = copy.copy(cls.model_fields[name])
        info.default, info.metadata = [info.default], [BeforeValidator(parse)]
        info.json_schema_extra = {**(info.json_schema_extra or {}), "metavar": metavar}
        return create_model(cls.__name__, __base__=cls, **{name: (list[info.annotation], info)})

    return wrap


class SpeedSettings(CheckedModel):
    """The speed switches (``device.Runtime``): each means the same on every device."""

    precision: Precision = option("auto", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.", resume_may_change=True)
    channels_last: ChannelsLast = option("auto", "channels_last memory format: auto (on GPU, off on CPU), on or off.",
                                         resume_may_change=True)
    compile: bool = option(False, "torch.compile the network (minutes to start; pays off on long GPU runs).",
                           resume_may_change=True)


class TrackingSettings(CheckedModel):
    """Where a training run's epoch records go besides metrics.jsonl (``advcl_cli.tracking``)."""

    log: NameList = option([], "Also log every epoch and the settings to tensorboard (RUN/tensorboard), wandb "
                               "(RUN/wandb; WANDB_MODE=offline needs no network) or both (tensorboard,wandb); each "
                               "needs its extra: pip install 'advcl[tensorboard]' or 'advcl[wandb]'.",
                           metavar="TRACKER,...", resume_may_change=True)

    @field_validator("log")
    @classmethod
    def _installed(cls, names: list[str]) -> list[str]:
        from ..tracking import check_available

        return check_available(names)


class RunFolderSettings(OutputSettings):
    """How a training verb (pretrain, finetune, lpaft) starts and saves its run folder (``out``
    with it); none of them changes what it computes."""

    resume: Resume = option("off", "Continue the run in the --out folder where it stopped (a bare --resume); auto: "
                                   "continue it if there is one, start it if not, print its path if it finished "
                                   "(one command line for a job that is requeued).", metavar="[auto]", record=False)
    save_every_minutes: float | None = option(None, "Also save a mid-epoch resume state every M minutes (default: "
                                                    "at every epoch's end, and on SIGTERM / SIGUSR1).", metavar="M", gt=0,
                                                resume_may_change=True)


class NormSettings(CheckedModel):
    """The threat model of a verb's attacks: ``norm`` linf or l2. Under l2 a budget that was not
    given is 0.5 (not 8/255), and a training attack's step size that was not given is eps/4."""

    norm: Norm = option("linf", "Threat model of the attacks: linf or l2 (l2: eps defaults to 0.5; pretraining "
                                "takes linf only, as every method here is defined under it).")

    @model_validator(mode="after")
    def _l2_defaults(self):
        if self.norm != "l2":
            return self
        if "eps" not in self.model_fields_set:
            self.eps = [L2_EPS] if isinstance(self.eps, list) else L2_EPS
        if "attack_step_size" in type(self).model_fields and "attack_step_size" not in self.model_fields_set:
            self.attack_step_size = self.eps / 4
        return self


MONITOR_HELP = ("Every N epochs (and after the last), the encoder's weighted kNN accuracy on the test split (k 200, "
                "cosine, temperature 0.1; the training split is the bank), clean and under a 3-step L-inf feature-space "
                "PGD at the run's eps (8/255 without one), in metrics.jsonl as knn_acc and knn_pgd_acc (0: off). "
                "Cost per call: a forward pass per training image, 2 forward and 3 forward-backward passes per test "
                "image (digits, resnet18-tiny, 2 busy CPU cores: 45-60 s, a third of a simclr epoch; "
                "benchmarks/knn_monitor.py).")


class MethodSettings(CheckedModel):
    """The pretraining method: a group of its own, the last base of ``PretrainSettings``, so that it
    is validated before the groups whose checks name it (``--norm l2`` is refused for the method)."""

    method: Name = option("advcl", "The pretraining method (see the method panels below).", short="-m")


@defaults(dataset="cifar10")
class PretrainSettings(DataSettings, SpeedSettings, NormSettings, TrackingSettings, RunFolderSettings, MethodSettings):
    """What every pretraining run has; the method's own settings (``methods.base.TrainSettings``
    and its options) are added to these in one model per method (``methods.settings_model``)."""

    section: ClassVar[str] = "pretrain"

    arch: str = option("resnet18", "resnet18, resnet34, resnet50, preact-resnet18, wrn-28-10, wrn-34-10, or any of them "
                                   "with -tiny (a slim test width).")
    save_every: int = option(50, "Save the encoder every N epochs (the resume state is saved every epoch).", ge=1,
                             resume_may_change=True)
    monitor_every: int = option(0, MONITOR_HELP, ge=0, resume_may_change=True)
    drop_last: bool = option(False, "Drop each epoch's last partial batch (default: keep it, as the reference does; "
                                    "a last batch of one image, or one that does not divide among the processes, is dropped).")

    @field_validator("norm")
    @classmethod
    def _linf_only(cls, norm: str, info: ValidationInfo) -> str:
        if norm != "linf":
            raise ValueError(f"{info.data.get('method', 'the method')} is defined under the L-inf threat model only "
                             "(its paper's attack); pretrain with linf, then finetune or evaluate with --norm l2")
        return norm


@defaults(dataset="cifar10", batch_size=512)
class PseudoLabelSettings(DataSettings, BatchSettings, OutputSettings):
    section: ClassVar[str] = "pseudo-labels"

    k: IntList = option([2, 10, 50, 100, 500], "Cluster counts, comma-separated.", metavar="K,K,...")
    bn_set: str | None = option(None, "The encoder's BN set to use (default its first, 'normal').")


class FinetuneSettings(DataSettings, BatchSettings, SpeedSettings, TrainingAttackSettings, NormSettings, TrackingSettings,
                       RunFolderSettings):
    section: ClassVar[str] = "finetune"

    scheme: Annotated[Scheme, BeforeValidator(_lower)] = option(
        "slf", "slf (frozen encoder, clean images), alf (frozen encoder, PGD-10 images), aff (whole network, TRADES) "
               "or autolora (AFF with a rank-8 LoRA branch for the clean loss, automatic loss weights and learning rate).",
        short="-s")
    epochs: int | None = option(None, "Epochs (default: the protocol's, see above).", ge=1)
    lr: float | None = option(None, "Learning rate (default: the protocol's).", gt=0)
    milestones: EpochList | None = option(None, "Epochs where lr is multiplied by 0.1 (default: the protocol's).",
                                        metavar="E,E,...")
    momentum: float = option(0.9, "SGD momentum.", ge=0)
    weight_decay: float = option(2e-4, "Weight decay.", ge=0)
    val_fraction: float = option(0.0, "Hold out this part of the training split and keep the epoch with the best "
                                      "PGD-20 accuracy on it (default 0: keep the last epoch).", ge=0, lt=1)
    bn_set: str | None = option(None, "The encoder's batch-norm set to start from (default: pgd, or its only set; "
                                      "AFF of an ACL-family encoder keeps normal and pgd).")
    eval_limit: int | None = option(None, "Test images for the final clean / PGD-20 accuracy (default all; 0: no final "
                                    "evaluation).", ge=0, resume_may_change=True)


@defaults(batch_size=512)
class LpaftSettings(DataSettings, BatchSettings, SpeedSettings, TrainingAttackSettings, TrackingSettings, RunFolderSettings):
    """DynACL++'s post-processing (``advcl lpaft``); the defaults are the authors' ``LPAFT.py``."""

    section: ClassVar[str] = "lpaft"

    clusters: int = option(10, "k-means clusters on the un-augmented training features: the pseudo-label classes "
                               "(the authors' 10 for every dataset).", ge=2)
    bn_set: str | None = option(None, "The encoder's BN set that is trained and kept (default: pgd, or its only set).")
    dual_bn: bool = option(False, "Keep the encoder's normal BN set too, unchanged (the authors' LPAFT_AFF.py: an "
                                  "encoder for AFF with both sets); default: a single-BN encoder (LPAFT.py).")
    probe_epochs: int = option(10, "Epochs of linear probing on the pseudo labels (encoder frozen, eval mode).", ge=0)
    probe_lr: float = option(0.01, "Learning rate of the linear probe (constant).", gt=0)
    epochs: int = option(25, "Epochs of TRADES on the pseudo labels (the whole network).", ge=1)
    lr: float = option(0.1, "Learning rate of the TRADES epochs.", gt=0)
    milestones: EpochList = option([10, 20], "TRADES epochs where lr is multiplied by 0.1.", metavar="E,E,...")
    momentum: float = option(0.9, "SGD momentum (both phases).", ge=0)
    weight_decay: float = option(1e-4, "Weight decay (both phases).", ge=0)


ATTACK_HELP = ("fgsm, pgd20 (any pgdN), cw20 (any cwN), autoattack, autoattack-plus, autoattack-rand, or one "
               "AutoAttack component: apgd-ce, apgd-t, fab-t, square")


@several("eps", parse_eps_list, metavar="EPS,...")  # one evaluation per eps
@defaults(batch_size=256, precision="fp32")
class EvalSettings(DataSettings, BatchSettings, SpeedSettings, BudgetSettings, NormSettings):
    section: ClassVar[str] = "eval"

    attack: NameList = option([], ATTACK_HELP + "; repeat or comma-separate for several.", short="-a", metavar="ATTACK")
    pgd_check: int = option(0, "Sanity check on the first N images (0: off): PGD-100 with 5 restarts beside PGD-20 at "
                               "every eps; PGD-20 above it by more than 5 points is flagged.", ge=0)


@defaults(out=Path("adv.safetensors"))
class AttackSettings(DatasetSettings, BudgetSettings, NormSettings, OutputSettings):
    section: ClassVar[str] = "attack"

    attack: Name = option("pgd20", ATTACK_HELP + ".", short="-a")
    n: int = option(64, "Attack the first N test images.", short="-n", ge=1)



def parse_schemes(value: Any) -> list[str]:
    """``slf,alf`` (or a list) -> finetuning schemes, each once."""
    names = parse_name_list(value)
    unknown = next((n for n in names if n not in SCHEME_NAMES), None)
    if unknown is not None or not names:
        start = f"unknown scheme '{unknown}'; " if unknown is not None else ""
        raise ValueError(start + f"choose from {', '.join(SCHEME_NAMES)} (comma-separated)")
    return names


@defaults(out=Path("runs/benchmark"))
class BenchmarkSettings(DataSettings, BatchSettings, SpeedSettings, BudgetSettings, OutputSettings):
    """`advcl benchmark`: every encoder finetuned with every scheme under the protocol of its
    method, then evaluated (SA, PGD-20, the RA attack(s), CA). ``limit`` counts training images."""

    section: ClassVar[str] = "benchmark"

    schemes: Annotated[list[str], BeforeValidator(parse_schemes)] = option(
        ["slf", "alf", "aff"], f"Finetuning schemes, comma-separated: {', '.join(SCHEME_NAMES)}.", short="-s",
        metavar="SCHEME,...")
    attack: NameList = option(["autoattack"], "The attack(s) of RA (robust accuracy; the worst case over several). "
                                              "PGD-20 is always measured too.", short="-a", metavar="ATTACK")
    transfer: str | None = option(None, "Also finetune and evaluate on this dataset at 32x32 (the benchmark's "
                                        "cross-task setting: stl10).")
    corruptions: Path | None = option(None, "Folder of CIFAR-10-C / CIFAR-100-C (or the folder above them) for CA "
                                            "(default: DATA_DIR/CIFAR-10-C when it exists; digits uses digits-c).",
                                      metavar="DIR")
    download_corruptions: bool = option(False, "Download CIFAR-10-C / CIFAR-100-C (zenodo, about 2.9 GB) into the "
                                               "data folder when it is not there (default: CA is skipped).")
    epochs: int | None = option(None, "Finetuning epochs of every scheme (default: the protocol's; smoke runs).", ge=1)
    eval_limit: int | None = option(None, "Evaluate only the first N test images (and of each corruption split).", ge=1)
    eval_batch_size: int = option(256, "Images per evaluation batch (the attacks' random starts follow it).", ge=1)


@defaults(dataset="cifar10")
class ImportSettings(DatasetNameSettings, OutputSettings, SettingsModel):
    """`advcl import` and `advcl pseudo-labels import`: the dataset of what they import, and the file they write."""

    section: ClassVar[str] = "import"


class HubSettings(SettingsModel):
    section: ClassVar[str] = "hub"

    hf_endpoint: Annotated[str | None, BeforeValidator(parse_url)] = option(None, "Hub URL, e.g. a mirror (default: $HF_ENDPOINT or https://huggingface.co).",
                                     aliases=("--endpoint",), metavar="URL")
    zoo_manifest: Path | None = option(None, "Zoo manifest file (default: the one shipped with advcl).",
                                       aliases=("--manifest",))


VERBS: dict[str, type[SettingsModel]] = {
    cls.section: cls for cls in (PretrainSettings, PseudoLabelSettings, FinetuneSettings, LpaftSettings, EvalSettings,
                                 AttackSettings, BenchmarkSettings, ImportSettings, HubSettings)
}


# --- what exists: every verb's and method's settings -----------------------------------------


def method_models() -> dict[str, type[BaseModel]]:
    """Each pretraining method's own settings model (imports the methods, and so torch)."""
    from ..methods import methods

    return {name: cls.Settings for name, cls in methods().items()}


def verb_fields() -> set[str]:
    """Every setting name of every verb (the methods not imported)."""
    return {f for cls in VERBS.values() for f in cls.model_fields}


def known_fields() -> set[str]:
    """Every setting name of every verb and method."""
    return verb_fields() | {f for cls in method_models().values() for f in cls.model_fields}


def is_known(name: str) -> bool:
    """A setting of some verb or method; the methods are imported only when needed."""
    return name in verb_fields() or name in known_fields()


def _value(value: Any) -> Any:
    if isinstance(value, dict):
        raise ValueError("a table where a value goes")
    return value


def _table(name: str, keys, tables: dict[str, type[BaseModel]] | None = None) -> type[BaseModel]:
    """A TOML table: ``keys`` take values, ``tables`` are its sub-tables (models); nothing else."""
    fields = {k: (Annotated[Any, BeforeValidator(_value)], None) for k in keys} | {k: (m, None) for k, m in (tables or {}).items()}
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


@functools.cache
def document_model(with_methods: bool) -> type[BaseModel]:
    """The TOML file's shape: top-level keys of some verb or method, a table per verb, under
    ``[pretrain]`` the keys of every method and a table per method (without the methods: the
    verbs' keys only)."""
    methods = {m: _table(m, cls.model_fields) for m, cls in method_models().items()} if with_methods else {}
    verbs = {verb: _table(verb, cls.model_fields) for verb, cls in VERBS.items()}
    method_keys = {k for m in methods.values() for k in m.model_fields}
    verbs["pretrain"] = _table("pretrain", {*PretrainSettings.model_fields, *method_keys}, methods)
    return _table("advcl.toml", known_fields() if with_methods else verb_fields(), verbs)


def settings_table() -> str:
    """The README's table of every setting: its TOML key, flag, environment variable and users
    (a test checks that the README holds exactly this table)."""
    users: dict[str, list[str]] = {}
    flags = set()
    models = [*VERBS.items(), *((f"pretrain --method {m}", cls) for m, cls in method_models().items())]
    for user, cls in models:
        for name, f in cls.model_fields.items():
            users.setdefault(name, []).append(user)
            if (f.json_schema_extra or {}).get("flag", True):
                flags.add(name)
    rows = ["| TOML key | flag | environment | used by |", "|---|---|---|---|"]
    for name in sorted(users):
        flag = f"`{flag_name(name)}`" if name in flags else "-"
        rows.append(f"| `{name}` | {flag} | `{env_name(name)}` | {', '.join(users[name])} |")
    return "\n".join(rows)
