"""`advcl eval`: clean and robust accuracy of a classifier checkpoint.

No ``from __future__ import annotations``: Typer reads the annotations at definition time.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..settings import EvalSettings
from .options import ConfigOpt, ForceOpt, JsonOpt, ModelArg, check_output, model_path, settings_options, with_options
from .output import Output

PlotOpt = Annotated[Optional[Path], typer.Option("--plot", help=escape("Write a PNG of robust accuracy against eps (needs advcl[plot]); missing folders on its path are created, as for --out."), show_default=False)]
PerImageOpt = Annotated[
    bool,
    typer.Option("--per-image", help="With --json: add each attack's per-image flags (a 0/1 string in image order; 1 = robust).", metavar=""),
]


def evaluate(model: ModelArg = None, plot: PlotOpt = None, force: ForceOpt = False, per_image: PerImageOpt = False,
             config: ConfigOpt = None, json_output: JsonOpt = False, **options) -> None:
    """Evaluate a classifier on its test split: clean accuracy and robust accuracy per attack.

    The dataset is the one the model was finetuned on unless --dataset says otherwise. A table
    goes to stdout (or one JSON document with --json: model path and sha256, dataset, n, eps,
    clean accuracy, robust accuracy and seconds per attack and eps; accuracies are fractions).
    Progress and the attacks' exact settings go to stderr. MODEL may be a path, a zoo name, or
    '-' / omitted to read a path from stdin. --plot is checked before the evaluation starts (an
    existing file is replaced only with --force), and the numbers are printed before it is
    written. An image counts as robust only if both its clean
    and its adversarial prediction are right; with several attacks a "worst case" row counts
    an image only if every attack failed on it. Under torchrun the test images are split
    among the processes (same numbers as one process).

    AutoAttack prints a line on stderr after each of its four attacks (images still robust,
    elapsed time, an estimate of the rest) and after each block of --batch-size images. Its
    later attacks run only on the images still robust and cost about 47 times APGD-CE per image:
    on 2 CPU cores a robust image of resnet18-tiny costs about 5 s when the cores are free
    (benchmarks/RESULTS.md, digits study) and minutes when other jobs load them; start with
    --limit.

    Every robust evaluation is checked for signs of a wrong number (sanity flags: train mode,
    randomness between two identical forwards, zero or non-finite input gradients, adversarial
    accuracy above clean, accuracy rising with eps; --pgd-check N adds PGD-100 x 5 restarts
    against PGD-20 on N images): each flag is one line on stderr saying what it suggests, and
    the list is kept in --json ("flags"). --norm l2 runs every attack under the L2 threat model
    (eps 0.5 unless --eps is given). --eps takes one budget or a comma-separated list (one row
    per eps); --precision is fp32 unless given (the attacks at full precision).

    Example, PGD-20 and AutoAttack on the first 20 test images of a classifier:

    \b
      clf=runs/slf/classifier.safetensors
      advcl eval $clf --attack pgd20 --attack autoattack --limit 20

    Robustness against eps, as a table and a picture (one line per attack):

    \b
      advcl eval $clf -a pgd20 --eps 2/255,4/255,8/255 --plot robustness.png

    L2, PGD-20 at eps 0.5 (AutoAttack's versions and components: -a autoattack-plus, autoattack-rand,
    apgd-ce, apgd-t, fab-t, square):

    \b
      advcl eval $clf --norm l2 -a pgd20

    Through a pipe, as JSON (offline, on the bundled digits data):

    \b
      advcl pretrain -d digits --arch resnet18-tiny --epochs 2 --batch-size 64 \\
          --out runs/piped \\
        | advcl finetune --scheme slf --epochs 2 --json \\
        | advcl eval --attack pgd20 --json

    On 8 GPUs (each takes an eighth of the images):

    \b
      torchrun --nproc-per-node 8 -m advcl_cli eval model.safetensors \\
        -a pgd20 -a autoattack
    """
    from ..attacks import get_attack
    from ..checkpoint import load_checkpoint
    from ..settings.layering import resolve
    from ..engine.evaluate import evaluate_checkpoint

    out = Output(json_output)
    settings = resolve(EvalSettings, options, config_file=config, warn=out.warn)
    attacks = list({a.name: a for a in (get_attack(n, settings.norm) for n in settings.attack)}.values())  # each once
    if per_image and not json_output:
        out.warn("--per-image adds the flags to the --json document; without --json it changes nothing")
    if plot is not None:
        _check_plot(attacks)
    path = model_path(model, config)
    check_output(plot, force, "--plot", {"the model being evaluated": path}, suffix=".png")
    ckpt = load_checkpoint(path, kind="classifier")
    done = evaluate_checkpoint(ckpt, settings, attacks, out.reporter())
    if not done.is_main:  # rank 0 prints
        return
    data, result = done.data, done.result
    doc = _document(path, ckpt, settings, data, result, per_image)
    chance = 1 / data.num_classes
    if result["clean_acc"] <= chance + 0.05:
        out.log(f"note: the clean accuracy {result['clean_acc']:.1%} is near or below chance ({chance:.1%} for "
                f"{data.num_classes} classes): the model has not learned much yet (a short run?), so its robust "
                "accuracy says little")
    out.table(_rows(result), title=f"{path.name} on {data.name} test, {result['n']} images", doc=doc)
    if plot is not None:  # after the numbers: a failed write loses nothing
        _plot(result, plot, path, data, out)


def _check_plot(attacks) -> None:
    """--plot needs matplotlib and an attack, checked before anything is evaluated."""
    from ..errors import UsageError
    from ..plots import require_matplotlib

    require_matplotlib()
    if not attacks:
        raise UsageError("--plot draws robust accuracy, so it needs at least one --attack", "add e.g. --attack pgd20")


def _document(path, ckpt, settings, data, result: dict, per_image: bool) -> dict:
    """The --json document."""
    from ..engine.evaluate import encode_flags

    doc = {
        "model": str(path),
        "sha256": ckpt.sha256,
        "arch": ckpt.meta.arch,
        "method": ckpt.meta.method,
        "dataset": data.name,
        "split": "test",
        "n": result["n"],
        "norm": settings.norm,
        "eps": list(settings.eps),
        "seed": settings.seed,
        **{k: result[k] for k in ("clean_acc", "nonfinite_logits", "robust", "worst_case", "flags", "pgd_check",
                                  "attacks", "runtime")},
    }
    if per_image:
        doc["per_image"] = {k: encode_flags(v) for k, v in result["per_image"].items()}
    return doc


def _rows(result: dict) -> list[dict]:
    """The table: clean, each attack and eps, the worst case over the attacks."""
    rows = [{"attack": "clean", "eps": "-", "accuracy %": f"{100 * result['clean_acc']:.2f}", "seconds": "", "images/s": ""}]
    for r in result["robust"]:
        rows.append({
            "attack": r["attack"], "eps": r["eps_label"], "accuracy %": f"{100 * r['robust_acc']:.2f}",
            "seconds": f"{r['seconds']:.1f}", "images/s": f"{r['images_per_s']:.1f}" if r["images_per_s"] else "",
        })
    for r in result["worst_case"]:
        rows.append({"attack": "worst case", "eps": r["eps_label"], "accuracy %": f"{100 * r['robust_acc']:.2f}",
                     "seconds": "", "images/s": ""})
    return rows


def _plot(result: dict, plot: Path, path: Path, data, out: Output) -> None:
    from ..errors import AdvclError
    from ..plots import robustness_curve

    try:
        robustness_curve({path.name: result}, plot, title=f"{path.name} on {data.name} (n={result['n']})")
    except AdvclError as e:
        e.message += "; the results above are complete"
        raise
    out.log(f"wrote {plot}")


with_options(evaluate, settings_options(EvalSettings))
