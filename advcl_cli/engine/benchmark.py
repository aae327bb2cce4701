"""The benchmark: every encoder finetuned with every scheme under its method's protocol, then
evaluated as the RobustSSL benchmark does: SA, PGD-20, RA (AutoAttack standard by default) and,
when a corruption set exists for the dataset, CA.

Cells. A cell is one (encoder, scheme, target): the target is the dataset (default the
encoder's) or, with ``transfer``, the transfer dataset at 32x32 (the cross-task setting). Its
key is the encoder's sha256[:12], the scheme, the target and a hash of everything that shapes
its numbers: the finetuning settings after ``with_protocol`` (the precision resolved; the
output folder, device, data folder and the finetuning's own test-image count left out, see
``FINETUNE_KEY_IGNORES``) and the evaluation settings (attacks, eps, test images, batch size,
seed, corruption set). The benchmark folder holds:

- ``finetune/<sha12>-<scheme>-<target>-<hash>/``: the finetuning run (``engine.finetune``),
  keyed by the finetuning settings alone, so a cell whose evaluation changes (another attack,
  CA added) reuses its finetuned classifier; an interrupted run is resumed from its last epoch;
- ``cells/<key>.json``: the finished cell's record, written atomically; a cell with one is
  loaded, not recomputed (``force`` recomputes);
- ``results.json`` (the records of this call's cells, in order; rewritten atomically after
  every cell), ``leaderboard.md`` (rewritten with it) and ``leaderboard.png`` (at the end).

Every input is checked before the first expensive step: the benchmark folder is writable, the
datasets known, the corruption folders valid, the encoders readable checkpoints.

Under torchrun every rank finetunes (as ``advcl finetune`` does) and evaluates its shard of the
test images (``evaluate(..., ctx=)``, ``corruption_accuracy(..., ctx=)``); rank 0 alone writes
and reports. Evaluation runs in fp32, as ``advcl eval`` does by default; ``precision`` is the
finetuning's.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from ..attacks import get_attack
from ..benchmark.leaderboard import Cell as LeaderboardCell, write_leaderboard
from ..checkpoint import Metadata, atomic_write, check_checkpoint, check_writable, load_checkpoint, parse_json, sha256_file
from ..data.corruptions import PUBLISHED, CorruptionSet, corruptions_for, load_corruptions
from ..data.registry import default_data_dir, num_classes_of
from ..errors import UsageError
from ..settings import BenchmarkSettings, FinetuneSettings, format_eps
from ..device import resolve_device, resolve_precision
from ..distributed import DistContext, barrier, init_distributed, on_main, shutdown
from ..plots import benchmark_chart, require_matplotlib
from ..report import Reporter
from .evaluate import corruption_accuracy, encode_flags, evaluate, flag_key, worst_case
from .finetune import CLASSIFIER_FILE, finetune, with_protocol
from .run import RunDir, load_split

CELL_FORMAT = 2  # part of every key: a change of what a cell holds recomputes the cells (2: the head starts at 0)
RESULTS_FILE = "results.json"
LEADERBOARD_FILE = "leaderboard.md"
CHART_FILE = "leaderboard.png"
PGD20 = "pgd20"  # always measured beside the RA attack(s)
TRANSFER_SIZE = 32  # the benchmark's cross-task setting: the transfer dataset at 32x32
EVAL_PRECISION = "fp32"
DEFAULT_SEED = BenchmarkSettings.model_fields["seed"].default
# finetuning settings that do not change the classifier (the precision does, and is keyed resolved)
FINETUNE_KEY_IGNORES = FinetuneSettings.resume_may_change() - {"precision"}


@dataclass(frozen=True)
class Encoder:
    name: str  # as given: a zoo name or a path
    path: Path
    sha256: str
    meta: Metadata


@dataclass(frozen=True)
class Target:
    dataset: str  # the dataset finetuned and evaluated on
    label: str  # the records' dataset: "cifar10", or "cifar10->stl10" for a transfer
    image_size: int | None
    transfer: bool = False


@dataclass
class Cell:
    key: str
    encoder: Encoder
    target: Target
    scheme: str
    finetune: FinetuneSettings  # the protocol filled in
    evaluation: dict  # what the key holds of the evaluation
    deviations: list[str]  # the protocol's settings this cell does not follow
    corruptions: CorruptionSet | None
    path: Path  # cells/<key>.json
    record: dict | None = None  # once finished (or loaded)
    cached: bool = False


@dataclass
class BenchmarkResult:
    cells: list[Cell]
    results: Path
    leaderboard: Path
    chart: Path | None
    is_main: bool = True

    @property
    def records(self) -> list[dict]:
        return [c.record for c in self.cells if c.record is not None]


def _digest(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


# --- checking the inputs -------------------------------------------------------------------------


def open_encoders(encoders: list[tuple[str, Path]], reporter: Reporter) -> list[Encoder]:
    """(name, path) pairs -> checked encoders (header only, weights not read), each once."""
    out: dict[str, Encoder] = {}
    for name, path in encoders:
        meta = check_checkpoint(path)
        sha = sha256_file(path)
        if sha in out:
            reporter.warn(f"{name} is the same file as {out[sha].name} (sha256 {sha[:12]}); benchmarking it once")
            continue
        out[sha] = Encoder(name, Path(path), sha, meta)
    return list(out.values())


def targets(settings: BenchmarkSettings, meta: Metadata) -> list[Target]:
    """The dataset (default the encoder's) and, with ``transfer``, the transfer dataset at 32x32
    (whatever ``image_size`` says: that is the cross-task setting)."""
    dataset = settings.dataset or meta.dataset
    num_classes_of(dataset)  # an unknown name is a DataError now
    found = [Target(dataset, dataset, settings.image_size)]
    if settings.transfer is not None:
        num_classes_of(settings.transfer)
        found.append(Target(settings.transfer, f"{dataset}->{settings.transfer}", TRANSFER_SIZE, transfer=True))
    return found


def corruption_set(settings: BenchmarkSettings, target: Target, reporter: Reporter, ctx: DistContext) -> CorruptionSet | None:
    """The corruption set of a target, checked: ``digits-c`` made here; CIFAR-10/100-C from
    ``corruptions`` (a bad folder is an error) or the data folder, downloaded there first with
    ``download_corruptions`` (by rank 0; absent and not downloaded: a warning, no CA)."""
    name = corruptions_for(target.dataset)
    if target.transfer or name is None:
        return None
    size = dict(limit=settings.eval_limit, image_size=target.image_size)
    if name not in PUBLISHED:
        return load_corruptions(name, seed=settings.seed, **size)
    if settings.corruptions is not None:
        return load_corruptions(name, folder=settings.corruptions, **size)
    spec = PUBLISHED[name]
    root = Path(settings.data_dir).expanduser() if settings.data_dir is not None else default_data_dir()
    if settings.download_corruptions and not (root / spec.folder).is_dir():
        reporter.log(f"getting {name} ({spec.url}, about 2.9 GB) into {root}")
        on_main(lambda: load_corruptions(name, data_dir=root, download=True), ctx)
    if (root / spec.folder).is_dir() or (root / spec.archive).is_file():
        return load_corruptions(name, data_dir=root, download=False, **size)
    reporter.warn(f"no {name} in {root}: CA is not measured on {target.dataset}; pass --corruptions DIR "
                  f"(the folder extracted from {spec.archive}, {spec.url}) or --download-corruptions")
    return None


def _finetune_settings(settings: BenchmarkSettings, encoder: Encoder, target: Target, scheme: str) -> FinetuneSettings:
    """The cell's finetuning settings: the protocol of the encoder's method, with the benchmark's
    own knobs. Built from the benchmark's settings alone: a [finetune] table or an ADVCL_* variable
    of `advcl finetune` does not reach the protocol."""
    # eval_limit 0: no final evaluation in the finetuning, the cell's own evaluation measures SA and PGD-20 once
    values = dict(dataset=target.dataset, scheme=scheme, epochs=settings.epochs, batch_size=settings.batch_size,
                  limit=settings.limit, image_size=target.image_size, eps=settings.eps, eval_limit=0,
                  precision=settings.precision, channels_last=settings.channels_last, compile=settings.compile,
                  device=settings.device, seed=settings.seed,
                  data_dir=settings.data_dir, download=settings.download)
    return with_protocol(FinetuneSettings(**values), encoder.meta.method, target.dataset, encoder.meta.dataset)


def deviations(settings: BenchmarkSettings, precision: str = "fp32", meta: Metadata | None = None) -> list[str]:
    """Every setting of a cell that differs from the published protocol, for the records: the
    smoke flags given, the finetuning ``precision`` when not fp32 (the benchmark trains in fp32),
    a seed other than advcl's default, and for a DeACL encoder (``meta``) a stem other than the
    network the benchmark evaluated (its ResNet pads the stem by 1)."""
    given = [f"{k}={getattr(settings, k)}" for k in ("epochs", "batch_size", "limit", "eval_limit", "image_size")
             if getattr(settings, k) is not None]
    if abs(settings.eps - 8 / 255) > 1e-12:
        given.append(f"eps={format_eps(settings.eps)}")
    if ra_attacks(settings) != ["autoattack"]:
        given.append(f"attack={','.join(ra_attacks(settings))}")
    if precision != "fp32":
        given.append(f"precision={precision} (the benchmark finetunes in fp32)")
    if settings.seed != DEFAULT_SEED:
        given.append(f"seed={settings.seed}")
    padding = (meta.model or {}).get("stem_padding", 1) if meta is not None else 1
    if meta is not None and str(meta.method).lower() == "deacl" and padding != 1:
        given.append(f"stem_padding={padding} (the DeACL authors' network; the benchmark evaluated DeACL with "
                     "padding 1, loading their weights with strict=False)")
    return given


def ra_attacks(settings: BenchmarkSettings) -> list[str]:
    """The RA attacks by canonical name, each once (an unknown name is a UsageError)."""
    return list(dict.fromkeys(get_attack(a).name for a in settings.attack))


def check_outputs(out: Path, force: bool) -> None:
    """results.json, leaderboard.md and leaderboard.png are replaced when a benchmark wrote them
    (results.json holds cell records), anything else only with --force; never a non-file."""
    outputs = [check_writable(out / name) for name in (RESULTS_FILE, LEADERBOARD_FILE, CHART_FILE)]
    present = [p for p in outputs if p.exists()]
    if present and not force and not _holds_records(out / RESULTS_FILE):
        raise UsageError(f"--out {out} already holds {present[0].name}, which no advcl benchmark wrote",
                         "choose another --out, or pass --force to replace it (--force also recomputes every cell)")


def _holds_records(path: Path) -> bool:
    try:
        doc = parse_json(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(doc, list) and all(isinstance(r, dict) and "key" in r for r in doc)


def plan(settings: BenchmarkSettings, encoders: list[Encoder], precision: str, reporter: Reporter,
         ctx: DistContext, force: bool = False) -> list[Cell]:
    """Every cell with its key, after checking every input (nothing is trained or loaded)."""
    if not encoders:
        raise UsageError("no ENCODER given", "pass checkpoint paths or zoo names, or pipe paths: ls runs/*/encoder.safetensors | advcl benchmark")
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a benchmark folder", "choose a folder")
    check_outputs(out, force)
    attacks = ra_attacks(settings)
    sets: dict[Target, CorruptionSet | None] = {}
    cells = []
    for enc in encoders:
        for target in targets(settings, enc.meta):
            if target not in sets:
                sets[target] = corruption_set(settings, target, reporter, ctx)
            cs = sets[target]
            for scheme in settings.schemes:
                name = f"{enc.sha256[:12]}-{scheme}-{_slug(target.dataset)}{'-transfer' if target.transfer else ''}"
                ft = _finetune_settings(settings, enc, target, scheme)
                trained = {k: v for k, v in ft.to_config().items() if k not in FINETUNE_KEY_IGNORES}
                trained.update(precision=precision, parent=enc.sha256, format=CELL_FORMAT)
                ft = ft.model_copy(update={"out": out / "finetune" / f"{name}-{_digest(trained)}"})
                evaluation = {  # deviations() follows from the rest of the key and the encoder
                    "attacks": attacks, "eps": settings.eps, "test": target.dataset, "image_size": target.image_size,
                    "eval_limit": settings.eval_limit, "eval_batch_size": settings.eval_batch_size,
                    "seed": settings.seed, "precision": EVAL_PRECISION, "corruptions": cs.name if cs else None,
                }
                key = f"{name}-{_digest({'finetune': trained, 'evaluate': evaluation})}"
                cells.append(Cell(key, enc, target, scheme, ft, evaluation, deviations(settings, precision, enc.meta), cs,
                                  out / "cells" / f"{key}.json"))
    if settings.corruptions is not None and not any(c.corruptions is not None and c.corruptions.name in PUBLISHED
                                                    for c in cells):
        reporter.warn(f"--corruptions {settings.corruptions} is not used: no cell is on cifar10 or cifar100")
    return cells


FRACTIONS = ("sa", "pgd20", "aa", "ra", "worst_case", "ca")


def check_record(record: dict) -> None:
    """A ValueError naming the first field of a stored cell record that the leaderboard could
    not read or that no evaluation gives (an edited file): the fields of a leaderboard row,
    accuracies as fractions in [0, 1]."""
    try:
        LeaderboardCell.model_validate(record)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"its {'.'.join(map(str, err['loc']))} {record.get(err['loc'][0])!r}: {err['msg']}") from None
    for name in FRACTIONS:
        value = record.get(name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
            raise ValueError(f"its {name} {value!r} is not an accuracy in [0, 1]")


def load_cell(cell: Cell, reporter: Reporter) -> dict | None:
    """The stored record of a finished cell, or None (a damaged or edited file is recomputed,
    with a warning)."""
    if not cell.path.is_file():
        return None
    try:
        record = parse_json(cell.path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("key") != cell.key:
            raise ValueError("not this cell's record")
        check_record(record)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reporter.warn(f"{cell.path} is unreadable ({e}); computing the cell again")
        return None
    # the same file may have been named differently this time
    return {**record, "encoder": cell.encoder.name, "encoder_path": str(cell.encoder.path)}


# --- one cell ------------------------------------------------------------------------------------


def _write_json(path: Path, doc) -> Path:
    text = json.dumps(doc, indent=1) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def run_cell(cell: Cell, test, *, device, ctx: DistContext, reporter: Reporter, force: bool) -> dict:
    """Finetune (resuming an interrupted run), evaluate, score CA; the cell's record."""
    s, enc = cell.finetune, cell.encoder
    run = RunDir(s.out, artifacts=(CLASSIFIER_FILE,))
    resume = run.state_path.is_file() and not force  # else a fresh run; leftovers of one that never saved are cleared
    t0 = time.perf_counter()
    result = finetune(s, load_checkpoint(enc.path), reporter, resume=resume, force=not resume)
    barrier(ctx)  # rank 0 writes the classifier after the others return
    t_finetune = time.perf_counter() - t0
    clf = load_checkpoint(result.path, kind="classifier")
    model = clf.build(device)
    attacks = list(dict.fromkeys([PGD20, *cell.evaluation["attacks"]]))
    eps = cell.evaluation["eps"]
    t1 = time.perf_counter()
    res = evaluate(model, test, attacks, [eps], batch_size=cell.evaluation["eval_batch_size"], device=device,
                   reporter=reporter, seed=cell.evaluation["seed"], precision=EVAL_PRECISION, ctx=ctx)
    t_eval = time.perf_counter() - t1
    acc = {r["attack"]: r["robust_acc"] for r in res["robust"]}
    ra_flags = worst_case(*(res["per_image"][flag_key(a, eps)] for a in cell.evaluation["attacks"]))
    ca, t_ca = None, 0.0
    if cell.corruptions is not None:
        t2 = time.perf_counter()
        ca = corruption_accuracy(model, cell.corruptions, batch_size=cell.evaluation["eval_batch_size"], device=device,
                                 reporter=reporter, precision=EVAL_PRECISION, ctx=ctx)
        t_ca = time.perf_counter() - t2
    epochs = RunDir(s.out).read_metrics()
    timings = {"finetune": sum(float(m.get("seconds", 0.0)) for m in epochs) or t_finetune,
               "evaluate": t_eval, "corruptions": t_ca}
    n = res["n"]
    return {
        "key": cell.key,
        "encoder": enc.name,
        "encoder_path": str(enc.path),
        "sha256": enc.sha256,
        "method": enc.meta.method,
        "pretrained_on": enc.meta.dataset,
        "dataset": cell.target.label,
        "finetune_dataset": cell.target.dataset,
        "transfer": cell.target.transfer,
        "scheme": cell.scheme,
        "n": n,
        "eps": eps,
        "sa": res["clean_acc"],
        "pgd20": acc[PGD20],
        "aa": acc.get("autoattack"),
        "ra": ra_flags.sum().item() / max(n, 1),
        "ra_attack": ",".join(cell.evaluation["attacks"]),
        "worst_case": res["worst_case"][0]["robust_acc"] if res["worst_case"] else acc[attacks[0]],
        "ca": ca["ca"] if ca else None,
        "corruptions": ca["name"] if ca else None,
        "ca_by_corruption": ca["by_corruption"] if ca else None,
        "seconds": sum(timings.values()),
        "timings": timings,
        "classifier": str(result.path),
        "classifier_sha256": clf.sha256,
        "device": device.type,
        "deviations": cell.deviations,
        "settings": {"finetune": s.to_config(), "evaluate": cell.evaluation},
        "attacks": res["attacks"],
        "flags": res["flags"],
        "per_image": {k: encode_flags(v) for k, v in res["per_image"].items()},
    }


# --- the benchmark -------------------------------------------------------------------------------


def write_outputs(out: Path, records: list[dict], title: str) -> tuple[Path, Path]:
    """results.json and leaderboard.md (atomic writes)."""
    results = _write_json(out / RESULTS_FILE, records)
    return results, write_leaderboard(records, out / LEADERBOARD_FILE, title=title)


def write_chart(out: Path, records: list[dict], title: str, reporter: Reporter) -> Path | None:
    """leaderboard.png, or a warning (and None) without matplotlib."""
    try:
        require_matplotlib()
    except UsageError as e:
        reporter.warn(f"{e.message}: no {CHART_FILE} ({e.hint})")
        return None
    return benchmark_chart(records, out / CHART_FILE, title=title)


def benchmark(settings: BenchmarkSettings, encoders: list[tuple[str, Path]], reporter: Reporter | None = None, *,
              force: bool = False, on_cell: Callable[[list[Cell]], None] | None = None) -> BenchmarkResult:
    """Run (or load) every cell of ``encoders`` (``(name, path)`` pairs) x ``settings.schemes`` x
    the targets; ``on_cell(cells)`` after each cell that finishes (and once first when some are
    already done). ``force`` recomputes every cell, finetuning included."""
    reporter = reporter or Reporter()
    device = resolve_device(settings.device)
    ctx = init_distributed(device)
    if not ctx.is_main:
        reporter, on_cell = Reporter(), None
    out = Path(settings.out)
    try:
        cells = plan(settings, open_encoders(encoders, reporter), resolve_precision(settings.precision, device), reporter, ctx,
                     force)
        for cell in cells:
            cell.record = None if force else load_cell(cell, reporter)
            cell.cached = cell.record is not None
        barrier(ctx)  # every rank has read the cells before rank 0 writes one
        title = "advcl benchmark: " + ", ".join(dict.fromkeys(c.target.label for c in cells))
        todo = [c for c in cells if c.record is None]
        if ctx.is_main:
            reporter.log(f"{len(cells)} cells: {len(cells) - len(todo)} done, {len(todo)} to run -> {out}")
            if on_cell is not None and len(todo) < len(cells):
                on_cell(cells)
        tests: dict[Target, object] = {}
        for i, cell in enumerate(todo, 1):
            if ctx.is_main:
                reporter.log(f"cell {i}/{len(todo)}: {cell.encoder.name} {cell.scheme.upper()} on {cell.target.label} ({cell.key})")
            if cell.target not in tests:  # the test split, once per target (downloaded once per node)
                tests[cell.target] = load_split(cell.target.dataset, "test", ctx, limit=settings.eval_limit,
                                                image_size=cell.target.image_size, data_dir=settings.data_dir,
                                                download=settings.download)
            record = run_cell(cell, tests[cell.target], device=device, ctx=ctx, reporter=reporter, force=force)
            if ctx.is_main:
                _write_json(cell.path, record)
                cell.record = record
                write_outputs(out, [c.record for c in cells if c.record is not None], title)
                if on_cell is not None:
                    on_cell(cells)
        if not ctx.is_main:
            return BenchmarkResult(cells, out / RESULTS_FILE, out / LEADERBOARD_FILE, None, is_main=False)
        records = [c.record for c in cells]
        results, leaderboard = write_outputs(out, records, title)
        chart = write_chart(out, records, title, reporter)
        return BenchmarkResult(cells, results, leaderboard, chart)
    finally:
        shutdown(ctx)
