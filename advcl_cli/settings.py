"""Configuration: one pydantic-settings model per verb, resolved in layers.

defaults < the TOML file (``--config FILE``, else ``$ADVCL_CONFIG``, else ``./advcl.toml``)
< ``ADVCL_*`` environment variables < command-line flags.

In the TOML file, top-level keys apply to every verb and a table named after the verb
(``[pretrain]``, ``[finetune]``, ``[eval]``, ``[attack]``, ``[hub]``) overrides them::

    data_dir = "/scratch/data"
    [pretrain]
    epochs = 200
    batch_size = 256

Environment variables are ``ADVCL_`` plus the field name in capitals (``ADVCL_EPOCHS=5``).
The resolved settings are stored in every checkpoint (``config`` in its metadata).
"""

from __future__ import annotations

import contextvars
import os
import sys
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("advcl_config", default=None)


def parse_eps(value: Any) -> float:
    """``8/255``, ``0.031`` or a number -> float in (0, 1]."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"'{value}' is not a number or a fraction like 8/255") from None
    value = float(value)
    if not 0 < value <= 1:
        raise ValueError(f"eps must be in (0, 1], got {value:g} (pixels are in [0, 1]; try 8/255)")
    return value


def format_eps(eps: float) -> str:
    """The inverse of ``parse_eps`` for people: 8/255 for multiples of 1/255, else the number."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


def parse_eps_list(value: Any) -> list[float]:
    """``2/255,4/255,8/255`` (or a list, or one value) -> at least one eps."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        value = [value]
    if not value:
        raise ValueError("give at least one eps, e.g. 8/255 or 2/255,4/255,8/255")
    return [parse_eps(v) for v in value]


def parse_int_list(value: Any) -> list[int]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    return [int(v) for v in value]


Eps = Annotated[float, BeforeValidator(parse_eps)]
EpsList = Annotated[list[float], BeforeValidator(parse_eps_list)]
IntList = Annotated[list[int], BeforeValidator(parse_int_list)]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "bf16", "fp32"]


class _TomlSource(PydanticBaseSettingsSource):
    """Top-level keys of the TOML file, overridden by the verb's own table."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, required
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = config_path()
        if path is None:
            return {}
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as e:
            raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"config file {path} is not valid TOML: {e}") from None
        section = self.settings_cls.section
        merged = {k: v for k, v in doc.items() if not isinstance(v, dict)}
        merged.update(doc.get(section, {}) if section else {})
        fields = self.settings_cls.model_fields
        return {k: v for k, v in merged.items() if k in fields}


def config_path() -> Path | None:
    explicit = _config_file.get() or os.environ.get("ADVCL_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise UsageError(f"config file not found: {path}")
        return path
    default = Path("advcl.toml")
    return default if default.is_file() else None


class AdvclSettings(BaseSettings):
    """Fields every verb shares."""

    model_config = SettingsConfigDict(env_prefix="ADVCL_", extra="ignore", validate_default=True)
    section: ClassVar[str] = ""

    data_dir: Path | None = None
    device: Device = "auto"
    seed: int = 0

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _TomlSource(settings_cls))

    @classmethod
    def resolve(cls, config_file: Path | None = None, **flags: Any):
        """Build the settings from all layers; flags that are None were not given."""
        token = _config_file.set(config_file)
        try:
            return cls(**{k: v for k, v in flags.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else "?"
            msg = err["msg"].removeprefix("Value error, ")
            raise UsageError(f"bad value for {name.replace('_', '-')}: {msg}") from None
        finally:
            _config_file.reset(token)

    def to_config(self) -> dict[str, Any]:
        """JSON-ready resolved configuration, for checkpoint metadata."""
        return self.model_dump(mode="json")


class PretrainSettings(AdvclSettings):
    section: ClassVar[str] = "pretrain"

    dataset: str = "cifar10"
    method: str = "advcl"
    arch: str = "resnet18"
    out: Path | None = None  # run folder; default runs/<method>-<dataset>-<arch>
    epochs: int = Field(1000, ge=1)
    batch_size: int = Field(512, ge=2)
    drop_last: bool = False  # keep the last partial batch, as the reference does (see Batches)
    lr: float = Field(0.5, gt=0)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int | None = Field(None, ge=0)  # None: 10 when batch_size > 256 (the paper's rule), else 0
    warmup_from: float = 0.01
    min_lr_ratio: float = 1e-3  # cosine decays to lr * this
    eps: Eps = 8 / 255
    pgd_steps: int = Field(5, ge=0)
    pgd_step_size: Eps = 2 / 255
    temperature: float = Field(0.5, gt=0)
    base_temperature: float = Field(0.07, gt=0)
    ce_weight: float = 0.2
    hfc_radius: float = Field(8.0, ge=0)
    pseudo_labels: Path | None = None
    save_every: int = Field(50, ge=1)
    limit: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=8)
    precision: Precision = "auto"
    compile: bool = False
    download: bool = True


class PseudoLabelSettings(AdvclSettings):
    section: ClassVar[str] = "pseudo_labels"

    dataset: str = "cifar10"
    ks: IntList = [2, 10, 50, 100, 500]
    batch_size: int = Field(512, ge=1)
    bn_set: str | None = None
    limit: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=8)
    download: bool = True


class FinetuneSettings(AdvclSettings):
    section: ClassVar[str] = "finetune"

    dataset: str | None = None  # default: the encoder's dataset
    scheme: Literal["slf", "alf", "aff"] = "slf"
    out: Path | None = None
    epochs: int = Field(25, ge=1)
    batch_size: int | None = Field(None, ge=1)  # 512 for slf/alf, 128 for aff
    lr: float | None = Field(None, gt=0)  # 0.01 for slf/alf, 0.1 for aff
    milestones: IntList | None = None  # lr x0.1 at these epochs: 10,20 (slf/alf), 15,20 (aff)
    momentum: float = 0.9
    weight_decay: float = 2e-4
    eps: Eps = 8 / 255
    attack_steps: int = Field(10, ge=1)
    attack_step_size: Eps = 2 / 255
    trades_beta: float = 6.0
    val_fraction: float = Field(0.0, ge=0, lt=1)
    bn_set: str = "pgd"  # the encoder's BN set to start from (if it has several)
    eval_limit: int | None = Field(None, ge=1)  # test images for the final SA / PGD-20 RA
    limit: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=8)
    precision: Precision = "auto"
    download: bool = True


class EvalSettings(AdvclSettings):
    section: ClassVar[str] = "eval"

    dataset: str | None = None  # default: the model's dataset
    attacks: list[str] = []
    eps: EpsList = [8 / 255]
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    image_size: int | None = Field(None, ge=8)
    precision: Precision = "fp32"
    download: bool = True


class AttackSettings(AdvclSettings):
    section: ClassVar[str] = "attack"

    dataset: str | None = None
    attack: str = "pgd20"
    eps: Eps = 8 / 255
    n: int = Field(64, ge=1)
    image_size: int | None = Field(None, ge=8)
    download: bool = True


class HubSettings(AdvclSettings):
    section: ClassVar[str] = "hub"

    hf_endpoint: str | None = None  # ADVCL_HF_ENDPOINT; else HF_ENDPOINT; else the Hub
    zoo_manifest: Path | None = None  # ADVCL_ZOO_MANIFEST; else the manifest shipped with advcl
