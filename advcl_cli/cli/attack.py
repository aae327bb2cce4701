"""`advcl attack`: adversarial examples of test images, saved as tensors (and a picture).

No ``from __future__ import annotations``: Typer reads the annotations at definition time.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..settings import AttackSettings
from .options import ConfigOpt, ForceOpt, JsonOpt, ModelArg, check_output, model_path, settings_options, with_options
from .output import Output

GridOpt = Annotated[
    Optional[Path],
    typer.Option("--grid", help=escape("Also write a PNG: clean / adversarial / amplified perturbation rows (needs advcl[plot]); missing folders are created."), show_default=False),
]


def attack(model: ModelArg = None, grid: GridOpt = None, force: ForceOpt = False,
           config: ConfigOpt = None, json_output: JsonOpt = False, **options) -> None:
    """Attack the first N test images of a classifier; print the path of the saved tensors.

    The safetensors file holds clean (float, [0, 1]), adversarial, labels, clean_pred and
    adv_pred, and its metadata (key advcl_attack) holds the model's path and sha256, the
    attack, eps, dataset, the accuracies and the class names (an image counts as robust only if
    both its clean and its adversarial prediction are right, as in `advcl eval`). --grid draws
    up to 8 columns. Existing files are kept unless --force is given.

    Example:

    \b
      advcl attack runs/slf/classifier.safetensors --attack pgd20 --n 64 \\
        --out adv-pgd20.safetensors --grid adv-pgd20.png

    Reading the result in Python:

    \b
      from safetensors import safe_open
      f = safe_open("adv-pgd20.safetensors", "pt")
      x_adv = f.get_tensor("adversarial")
    """
    from ..checkpoint import load_checkpoint
    from ..settings.layering import resolve
    from ..engine.attack import attack_test_images, save_attacked
    from ..errors import AdvclError
    from ..settings import format_eps

    output = Output(json_output)
    settings = resolve(AttackSettings, options, config_file=config, warn=output.warn)
    if grid is not None:
        from ..plots import require_matplotlib

        require_matplotlib()
    path = model_path(model, config)
    out = settings.out
    check_output(out, force, "--out", {"the model being attacked": path})
    check_output(grid, force, "--grid", {"the model being attacked": path, "also --out": out}, suffix=".png")
    ckpt = load_checkpoint(path, kind="classifier")
    reporter = output.reporter()
    try:
        attacked = attack_test_images(ckpt, settings, reporter)
    finally:
        reporter.finish()
    meta, res = attacked.meta, attacked.tensors
    save_attacked(out, attacked)
    output.log(f"clean accuracy {meta['clean_acc']:.2%}, under {meta['attack']} {meta['adv_acc']:.2%} ({meta['n']} images)")
    if grid is not None:
        from ..plots import adversarial_grid

        try:
            adversarial_grid(
                res["clean"], res["adversarial"], res["labels"], res["clean_pred"], res["adv_pred"], attacked.classes,
                settings.eps, grid, title=f"{path.name}: {meta['attack']}, eps {format_eps(settings.eps)}",
            )
        except AdvclError as e:  # the tensors are saved: say where
            e.message += f"; the adversarial examples are saved in {out}"
            raise
        output.log(f"wrote {grid}")
    if json_output:
        output.document({"path": str(out), **({"grid": str(grid)} if grid else {}), **meta})
    else:
        output.result(out)


with_options(attack, settings_options(AttackSettings))

