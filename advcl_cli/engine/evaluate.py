"""Batched robust evaluation: clean accuracy, robust accuracy per (attack, eps), the worst case
over several attacks, and corruption accuracy (CA).

Used by ``advcl eval``, by finetuning's final metrics and by the zoo. The dataset sits on the
device as uint8; each batch is converted to [0, 1] floats there. Per-image results stay on the
device and are read once per attack (no per-batch ``.item()`` in one process), so the GPU never
waits for the host inside a loop. The model is put in eval mode for the whole evaluation.

An image counts as robust only when both its clean and its adversarial prediction are right
(the worst case over the two, as AutoAttack and RobustBench count), so robust accuracy never
exceeds clean accuracy. Over several attacks, the worst case counts an image only if every
attack failed on it (auto-attack#45); the per-image flags are returned, so a later attack's
flags combine with stored ones (``worst_case``) without rerunning.

Sharding (torchrun): the test images are cut into blocks of ``batch_size``; block k's random
starts (and AutoAttack's seed) are ``block_seed(seed, k)``, and every forward pass sees one
whole block, so nothing depends on how many processes share the work. Each rank takes a
contiguous run of blocks (``shard``), the per-image flags are gathered in the original order,
and one small all-reduce per batch adds every rank's images to rank 0's progress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..attacks import Attack, get_attack
from ..checkpoint import not_a_classifier, unwrap
from ..data.augment import to_float
from ..data.corruptions import SEVERITIES, CorruptionSet
from ..data.registry import ImageData, num_classes_of
from ..device import Runtime, resolve_channels_last, runtime_of
from ..distributed import DistContext, gather_shards, init_distributed, shutdown, sum_over_ranks
from ..errors import DataError
from ..report import Reporter, duration
from ..settings import format_eps
from .run import load_split
from .sanity import check_pgd, describe, model_flags, result_flags


def robust_correct(clean_pred: torch.Tensor, adv_pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image: robust only if both its clean and its adversarial prediction are right."""
    return (clean_pred == labels) & (adv_pred == labels)


class _Logits(nn.Module):
    """The model's logits in fp32 (autocast, channels_last inputs as the runtime says)."""

    def __init__(self, model: nn.Module, runtime: Runtime):
        super().__init__()
        self.model, self.runtime = model, runtime
        self.train(False)  # a wrapper in eval mode (the sanity check looks at every module)

    def forward(self, x):
        with self.runtime.autocast():
            out = self.model(self.runtime.images(x))
        return out.float()


def _runtime(device, precision: str, channels_last: bool | None, compile: bool) -> Runtime:
    """The evaluation's ``Runtime``: channels_last None means on for CUDA, off on the CPU."""
    device = torch.device(device)
    return Runtime(device, precision, resolve_channels_last(channels_last, device), compile)


def _prepare(model: nn.Module, runtime: Runtime) -> nn.Module:
    """On the device, in eval mode, in the runtime's memory format, compiled if asked."""
    return runtime.compiled(runtime.place(model).eval())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predictions(model: nn.Module, images: torch.Tensor, batch_size: int, nonfinite: list | None = None) -> torch.Tensor:
    """Predicted labels for uint8 or float images, batched, no gradients. With ``nonfinite`` (a
    list), the per-image flags "some logit is NaN or inf" are appended to it (one tensor)."""
    out, bad = [], []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            chunk = images[i : i + batch_size]
            x = to_float(chunk) if chunk.dtype == torch.uint8 else chunk
            logits = model(x)
            out.append(logits.argmax(1))
            bad.append(_nonfinite_rows(logits))
    if nonfinite is not None:
        nonfinite.append(torch.cat(bad) if bad else torch.zeros(0, dtype=torch.bool, device=images.device))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=images.device)


def _nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Per image: some logit is NaN or inf (its argmax, and so its score, means nothing)."""
    return ~torch.isfinite(logits).all(1)


@dataclass(frozen=True)
class Shard:
    """This rank's part of an evaluation: whole blocks of ``block`` images (global block
    indices), contiguous in rank order; the first ranks take one block more when the blocks do
    not divide evenly."""

    blocks: list[tuple[int, int, int]]  # (block index, first image, end) on this rank
    steps: int  # the most blocks any rank has: every rank loops this many times
    sizes: list[int]  # images per rank, for the gather
    start: int  # this rank's images are [start, stop)
    stop: int


def shard(n: int, block: int, ctx: DistContext | None = None) -> Shard:
    """Split ``n`` images into blocks of ``block`` and the blocks among the ranks."""
    ctx = ctx or DistContext()
    per, extra = divmod(-(-n // block), ctx.world_size)
    counts = [per + (r < extra) for r in range(ctx.world_size)]
    firsts = [sum(counts[:r]) for r in range(ctx.world_size)]
    ranges = [(min(f * block, n), min((f + c) * block, n)) for f, c in zip(firsts, counts)]
    first, count = firsts[ctx.rank], counts[ctx.rank]
    blocks = [(k, k * block, min((k + 1) * block, n)) for k in range(first, first + count)]
    start, stop = ranges[ctx.rank]
    return Shard(blocks, max(counts), [b - a for a, b in ranges], start, stop)


def block_seed(seed: int, block: int) -> int:
    """The seed of one block's random starts (and AutoAttack's): a function of the run's seed and
    the block's place in the test split only, so any number of processes draws the same."""
    return seed * 1_000_003 + block


def flag_key(attack: str, eps: float) -> str:
    """The name of an (attack, eps)'s per-image flags: ``pgd20@8/255``."""
    return f"{attack}@{format_eps(eps)}"


def worst_case(*flags: torch.Tensor | str) -> torch.Tensor:
    """Per image, robust only if robust under every attack given (each attack's flags already
    need the clean prediction right). Takes tensors or ``encode_flags`` strings, so flags stored
    by an earlier run combine with a later attack's without rerunning anything."""
    if not flags:
        raise ValueError("worst_case needs at least one set of flags")
    tensors = [decode_flags(f) if isinstance(f, str) else f.bool().cpu() for f in flags]
    sizes = sorted({len(t) for t in tensors})
    if len(sizes) > 1:
        raise DataError(f"per-image flags cover different numbers of images ({', '.join(map(str, sizes))})",
                        "combine results measured on the same test images")
    out = tensors[0].clone()
    for t in tensors[1:]:
        out &= t
    return out


def encode_flags(flags: torch.Tensor) -> str:
    """Per-image flags as a string of 0 and 1 (image order), for JSON records."""
    return "".join("1" if f else "0" for f in flags.bool().cpu().tolist())


def decode_flags(text: str) -> torch.Tensor:
    if set(text) - {"0", "1"}:
        raise DataError("per-image flags must be a string of 0 and 1", "use the flags a results file stores")
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def _classifier_logits(model: nn.Module, num_classes: int, name: str, runtime: Runtime) -> _Logits:
    """The model ready to evaluate (eval mode, on the device) after checking it classifies
    ``num_classes`` classes."""
    net = unwrap(model)
    if net.fc is None:
        raise not_a_classifier("the model has no classifier head")
    if num_classes != net.config.num_classes:
        raise DataError(
            f"the classifier has {net.config.num_classes} classes but dataset '{name}' has {num_classes}",
            "evaluate on the dataset it was finetuned on (--dataset)",
        )
    return _Logits(_prepare(model, runtime), runtime)


def _local(data: ImageData, part: Shard, device) -> tuple[torch.Tensor, torch.Tensor]:
    return data.images[part.start : part.stop].to(device), data.labels[part.start : part.stop].to(device)


def evaluate(
    model: nn.Module,
    data: ImageData,
    attacks: Sequence[str | Attack] = (),
    eps_list: Sequence[float] = (8 / 255,),
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
    seed: int = 0,
    precision: str = "fp32",
    ctx: DistContext | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
    pgd_check: int = 0,
) -> dict:
    """Clean accuracy and, for every attack and eps, robust accuracy and seconds.

    Returns ``{"n", "clean_acc", "nonfinite_logits", "robust": [{"attack", "norm", "eps",
    "eps_label", "robust_acc", "adv_acc", "seconds", "images_per_s", "nonfinite_logits"}],
    "worst_case": [{"eps", "eps_label", "attacks", "robust_acc"}], "flags": the sanity flags
    (``engine.sanity``; each also warned in one line), "pgd_check": its rows (``pgd_check``
    images, 0: not run),
    "attacks": {name: description}, "runtime": what ran (``Runtime.record``), "per_image": {"clean" | flag_key(attack, eps) |
    "worst@EPS": bool tensor (n,)}}``; accuracies are fractions. ``nonfinite_logits`` counts the
    images whose logits held NaN or inf (clean, and per attack on the adversarial images); any
    is reported as a warning, since their predictions (an argmax over NaN) mean nothing. ``worst_case`` has one row per
    eps when there are several attacks: an image counts only if every attack failed on it.
    ``adv_acc`` is the accuracy on the adversarial images alone (a sanity flag when above clean).

    The images are taken in blocks of ``batch_size``; block k's random starts come from a
    generator seeded with ``block_seed(seed, k)``. With ``ctx`` (torchrun) every rank evaluates
    its shard of whole blocks and the per-image flags are gathered, so N processes give what
    one gives, and rank 0's progress counts every rank's images.
    """
    ctx = ctx or DistContext()
    reporter = reporter if reporter is not None and ctx.is_main else Reporter()
    device = torch.device(device)
    attacks = [a if isinstance(a, Attack) else get_attack(a) for a in attacks]
    runtime = _runtime(device, precision, channels_last, compile)
    logits = _classifier_logits(model, data.num_classes, data.name, runtime)
    n = len(data)
    part = shard(n, batch_size, ctx)
    images, labels = _local(data, part, device)

    t0 = time.perf_counter()
    bad: list = []
    clean_pred = predictions(logits, images, batch_size, bad)  # block by block: the shard starts at a block
    per_image = {"clean": gather_shards(clean_pred == labels, part.sizes, ctx).cpu()}
    clean_acc = per_image["clean"].sum().item() / max(n, 1)
    reporter.log(f"clean accuracy {clean_acc:.2%} on {n} images ({time.perf_counter() - t0:.1f} s)")
    nonfinite = {"clean": int(gather_shards(bad[0], part.sizes, ctx).sum().item())}
    _warn_nonfinite(reporter, nonfinite["clean"], n, "clean images")
    flags = []
    if attacks and part.blocks:  # the model checks, on this process's first block
        _, a, b = part.blocks[0]
        flags += model_flags(logits, to_float(images[: b - a]), labels[: b - a])

    results = []
    gen = torch.Generator(device=device)
    for attack in attacks:
        for eps in eps_list:
            row, per_image[flag_key(attack.name, eps)] = _attack_run(
                attack, eps, logits, images, labels, clean_pred, part=part, ctx=ctx, device=device, gen=gen, seed=seed,
                reporter=reporter)
            results.append(row)
    worst = _worst_cases(attacks, eps_list, per_image, n, reporter)
    flags += result_flags(clean_acc, results)
    checked = []
    if pgd_check and ctx.is_main:  # PGD-100 x 5 restarts beside PGD-20, on the first images
        k = min(pgd_check, n)
        norm = attacks[0].norm if attacks else "linf"
        reporter.log(f"pgd check: PGD-20 and PGD-100 x 5 restarts ({norm}) on {k} images")
        checked, more = check_pgd(logits, to_float(data.images[:k].to(device)), data.labels[:k].to(device),
                                  eps_list, norm, seed)
        flags += more
    for f in flags:
        reporter.warn(describe(f))
    return {
        "n": n,
        "clean_acc": clean_acc,
        "nonfinite_logits": nonfinite["clean"],
        "robust": results,
        "worst_case": worst,
        "flags": flags,
        "pgd_check": checked,
        "attacks": {a.name: a.description for a in attacks},
        "per_image": per_image,
        "runtime": runtime.record(),
    }


def _attack_run(attack: Attack, eps: float, logits, images: torch.Tensor, labels: torch.Tensor, clean_pred: torch.Tensor, *,
                part: Shard, ctx: DistContext, device: torch.device, gen: torch.Generator, seed: int,
                reporter: Reporter) -> tuple[dict, torch.Tensor]:
    """One attack at one eps over this process's blocks: its row of ``robust`` and the gathered
    per-image robust flags (every rank loops ``part.steps`` times, so the progress sums agree)."""
    n = sum(part.sizes)
    label = f"{attack.name} eps={format_eps(eps)}"
    progress = {"progress": reporter.log} if attack.kind == "autoattack" else {}  # AutoAttack's own lines
    local, local_bad, local_adv = [], [], []
    reporter.start(label, n, unit="img")
    _sync(device)
    start = time.perf_counter()
    for step in range(part.steps):
        done = 0
        if step < len(part.blocks):
            k, a, b = part.blocks[step]
            a, b = a - part.start, b - part.start
            x, y = to_float(images[a:b]), labels[a:b]
            gen.manual_seed(block_seed(seed, k))
            x_adv = attack(logits, x, y, eps, gen=gen, seed=block_seed(seed, k), log=reporter.warn, **progress)
            with torch.no_grad():
                adv_logits = logits(x_adv)
            adv_pred = adv_logits.argmax(1)
            local_bad.append(_nonfinite_rows(adv_logits))
            local.append(robust_correct(clean_pred[a:b], adv_pred, y))
            local_adv.append(adv_pred == y)
            done = b - a
            if attack.kind == "autoattack":  # minutes per block on a CPU: say where it stands
                _block_progress(reporter, label, local, b, part, start)
        reporter.advance(sum_over_ranks(done, ctx, device))

    def gathered(flags: list) -> torch.Tensor:
        mine = torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool, device=device)
        return gather_shards(mine, part.sizes, ctx)

    robust = gathered(local).cpu()
    acc = robust.sum().item() / max(n, 1)  # the one sync of this attack
    adv_acc = gathered(local_adv).sum().item() / max(n, 1)
    n_bad = int(gathered(local_bad).sum().item())
    seconds = time.perf_counter() - start
    reporter.finish()
    reporter.log(f"{label}: robust accuracy {acc:.2%} ({seconds:.1f} s)")
    _warn_nonfinite(reporter, n_bad, n, f"images attacked by {label}")
    row = {
        "attack": attack.name,
        "norm": attack.norm,
        "eps": eps,
        "eps_label": format_eps(eps),
        "robust_acc": acc,
        "adv_acc": adv_acc,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else None,
        "nonfinite_logits": n_bad,
    }
    return row, robust


def _worst_cases(attacks: list[Attack], eps_list: Sequence[float], per_image: dict, n: int, reporter: Reporter) -> list[dict]:
    """With several attacks, per eps: an image counts only if every attack failed on it (its
    flags go into ``per_image`` as ``worst@EPS``)."""
    worst = []
    if len(attacks) > 1:
        for eps in eps_list:
            worst_flags = per_image[f"worst@{format_eps(eps)}"] = worst_case(*(per_image[flag_key(a.name, eps)] for a in attacks))
            acc = worst_flags.sum().item() / max(n, 1)
            worst.append({"eps": eps, "eps_label": format_eps(eps), "attacks": [a.name for a in attacks], "robust_acc": acc})
            reporter.log(f"worst case over {', '.join(a.name for a in attacks)} eps={format_eps(eps)}: {acc:.2%}")
    return worst


def _block_progress(reporter: Reporter, label: str, local: list, end: int, part: Shard, start: float) -> None:
    """A line after a block: this process's images done and still robust, the time so far and
    an estimate of the rest at the speed so far."""
    done, total = end, part.stop - part.start
    robust = int(sum(int(f.sum()) for f in local))
    elapsed = time.perf_counter() - start
    left = f", about {duration(elapsed / done * (total - done))} left" if done < total else ""
    reporter.log(f"{label}: {done}/{total} images, {robust} robust so far, {duration(elapsed)} elapsed{left}")


def _warn_nonfinite(reporter: Reporter, bad: int, n: int, what: str) -> None:
    if bad:
        reporter.warn(f"the model's logits are NaN or inf for {bad} of {n} {what}: "
                      "their predictions are arbitrary, so the accuracy means little")


def corruption_accuracy(
    model: nn.Module,
    corruptions: CorruptionSet,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
    precision: str = "fp32",
    ctx: DistContext | None = None,
    channels_last: bool | None = None,
) -> dict:
    """CA: the mean accuracy over every (corruption, severity) split of a corruption set (15 x 5),
    with the table behind it. Returns ``{"name", "n" (images per split), "ca", "by_corruption":
    {corruption: mean over severities}, "splits": [{"corruption", "severity", "acc"}]}``.
    Sharded like ``evaluate`` under torchrun (every rank predicts its part of each split)."""
    ctx = ctx or DistContext()
    reporter = reporter if reporter is not None and ctx.is_main else Reporter()
    device = torch.device(device)
    logits = _classifier_logits(model, corruptions.num_classes, corruptions.name,
                                _runtime(device, precision, channels_last, False))
    rows = []
    reporter.start(f"corruptions {corruptions.name}", len(corruptions) * corruptions.n, unit="img")
    start = time.perf_counter()
    for corruption, severity, split in corruptions:
        part = shard(len(split), batch_size, ctx)
        images, labels = _local(split, part, device)
        right = gather_shards(predictions(logits, images, batch_size) == labels, part.sizes, ctx)
        rows.append({"corruption": corruption, "severity": severity, "acc": right.sum().item() / max(len(split), 1)})
        reporter.advance(len(split))
    reporter.finish()
    by_corruption = {c: sum(r["acc"] for r in rows if r["corruption"] == c) / len(SEVERITIES) for c in corruptions.corruptions}
    ca = sum(r["acc"] for r in rows) / max(len(rows), 1)
    reporter.log(f"{corruptions.name}: corruption accuracy {ca:.2%} over {len(rows)} splits ({time.perf_counter() - start:.1f} s)")
    return {"name": corruptions.name, "n": corruptions.n, "ca": ca, "by_corruption": by_corruption, "splits": rows}


def adversarial_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Attack,
    eps: float,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    reporter: Reporter | None = None,
    precision: str = "fp32",
    channels_last: bool | None = None,
) -> dict:
    """Attack float images ``x`` in batches; return clean and adversarial images and predictions
    (on the CPU): ``{"clean", "adversarial", "labels", "clean_pred", "adv_pred"}``."""
    reporter = reporter or Reporter()
    device = torch.device(device)
    attack = attack if isinstance(attack, Attack) else get_attack(attack)
    runtime = _runtime(device, precision, channels_last, False)
    logits = _Logits(_prepare(model, runtime), runtime)
    gen = torch.Generator(device=device).manual_seed(seed)
    adv, clean_pred, adv_pred = [], [], []
    reporter.start(f"{attack.name} eps={format_eps(eps)}", x.shape[0], unit="img")
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        xa = attack(logits, xb, yb, eps, gen=gen, seed=seed, log=reporter.warn)
        with torch.no_grad():
            clean_pred.append(logits(xb).argmax(1))
            adv_pred.append(logits(xa).argmax(1))
        adv.append(xa)
        reporter.advance(xb.shape[0])
    reporter.finish()
    return {
        "clean": x.cpu(), "adversarial": torch.cat(adv).cpu(), "labels": y.cpu(),
        "clean_pred": torch.cat(clean_pred).cpu(), "adv_pred": torch.cat(adv_pred).cpu(),
    }


def class_names_differ(ckpt, data) -> str | None:
    """A warning when the classifier ``ckpt`` was trained on other classes than ``data`` has:
    its outputs are scored by class index, so against other names they mean little. Without
    recorded names (older classifiers) only a different dataset is said; None when all agree."""
    trained = ckpt.meta.config.get("classes")
    if not isinstance(trained, list):
        if str(data.name).lower() != str(ckpt.meta.dataset).lower():
            return (f"the classifier was finetuned on '{ckpt.meta.dataset}', not '{data.name}', and does not record "
                    "its class names: check that the classes are the same, in the same order")
        return None
    if [str(c) for c in trained] == [str(c) for c in data.classes]:
        return None

    def names(classes) -> str:
        return ", ".join(map(str, classes[:5])) + (f", ... ({len(classes)} in all)" if len(classes) > 5 else "")

    return (f"the classifier was trained on the classes {names(trained)} (of '{ckpt.meta.dataset}') but "
            f"'{data.name}' has the classes {names(data.classes)}: outputs are scored by class index, so the "
            "accuracy may mean nothing")


def load_test_data(ckpt, dataset: str | None = None, *, split: str = "test", limit: int | None = None,
                   image_size: int | None = None, data_dir=None, download: bool = True,
                   ctx: DistContext | None = None, warn=None) -> ImageData:
    """The split to evaluate ``ckpt`` on: its own dataset unless ``dataset`` is given, at the
    image size it was finetuned at unless ``image_size`` is given; the class counts must match,
    and ``warn`` (a callable) hears when the class names differ from those the classifier was
    trained on. Under torchrun (``ctx``) each node downloads it once."""
    name = dataset or ckpt.meta.dataset
    want = ckpt.meta.num_classes
    known = num_classes_of(name)
    if known is not None and known != want:
        raise DataError(
            f"dataset '{name}' has {known} classes but the classifier {ckpt.path} has {want}",
            f"evaluate it on its own dataset ('{ckpt.meta.dataset}') or one with {want} classes",
        )
    if image_size is None:
        image_size = ckpt.meta.config.get("image_size")
    data = load_split(name, split, ctx or DistContext(), data_dir=data_dir, download=download, limit=limit,
                      image_size=image_size)
    if data.num_classes != want:
        raise DataError(
            f"dataset '{name}' has {data.num_classes} classes but the classifier {ckpt.path} has {want}",
            f"evaluate it on its own dataset ('{ckpt.meta.dataset}') or one with {want} classes",
        )
    if warn is not None:
        note = class_names_differ(ckpt, data)
        if note:
            warn(note)
    return data


@dataclass(frozen=True)
class CheckpointEvaluation:
    """What ``evaluate_checkpoint`` measured: the test split and ``evaluate``'s result."""

    data: ImageData
    result: dict
    is_main: bool  # False on the other ranks of a torchrun job (they print nothing)


def evaluate_checkpoint(ckpt, settings, attacks: Sequence[Attack], reporter: Reporter | None = None) -> CheckpointEvaluation:
    """`advcl eval`'s run: the classifier checkpoint ``ckpt`` on its test split with the
    ``EvalSettings`` ``settings``: device and precision, the process group (under torchrun every
    rank evaluates its share of the images, and every rank leaves the group however it ends), the
    split (``load_test_data``), each attack's exact settings said on rank 0, then ``evaluate``."""
    reporter = reporter or Reporter()
    runtime = runtime_of(settings)
    ctx = init_distributed(runtime.device)
    shown = reporter if ctx.is_main else Reporter()
    try:
        data = load_test_data(ckpt, settings.dataset, limit=settings.limit, image_size=settings.image_size,
                              data_dir=settings.data_dir, download=settings.download, ctx=ctx,
                              warn=reporter.warn if ctx.is_main else None)
        for a in attacks:
            shown.log(f"{a.name}: {a.description}")
        try:
            result = evaluate(
                ckpt.build(runtime.device), data, attacks, settings.eps, batch_size=settings.batch_size,
                device=runtime.device, reporter=shown, seed=settings.seed, precision=runtime.precision, ctx=ctx,
                channels_last=runtime.channels_last, compile=runtime.compile, pgd_check=settings.pgd_check,
            )
        finally:
            shown.finish()
    finally:
        shutdown(ctx)
    return CheckpointEvaluation(data, result, ctx.is_main)
