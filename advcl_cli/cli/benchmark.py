"""`advcl benchmark`: the RobustSSL protocol over encoders x schemes, resumable cell by cell.

No ``from __future__ import annotations``: Typer reads the annotations at definition time.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..settings import BenchmarkSettings
from .options import ConfigOpt, ForceOpt, JsonOpt, model_path, settings_options, stdin_lines, with_options
from .output import Output

EncodersArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Encoder checkpoint paths or zoo names; '-' or none: paths on stdin, one a line.",
                   show_default=False, metavar="ENCODER..."),
]
STDIN_HINT = "pass checkpoint paths or zoo names, or pipe paths: ls runs/*/encoder.safetensors | advcl benchmark"


def benchmark(encoders: EncodersArg = None, force: ForceOpt = False, config: ConfigOpt = None,
              json_output: JsonOpt = False, **options) -> None:
    """Finetune every encoder with every scheme under its method's protocol, then measure SA,
    PGD-20, RA (AutoAttack standard) and CA; print the path of results.json.

    Each (encoder, scheme, dataset) is a cell, kept in the --out folder (default runs/benchmark) under a key made of the
    encoder's sha256 and the cell's settings: a finished cell is loaded, not recomputed, so an
    interrupted benchmark (Ctrl-C, SIGTERM: exit 130) continues where it stopped when the same
    command runs again, and a finished one prints its table at once. The folder gets
    results.json (one record per cell: the encoder's sha256 and method, the settings, SA, PGD-20,
    RA, CA, per-image flags, seconds), leaderboard.md (RobustSSL layout, the published numbers for
    the same method and dataset under each encoder) and leaderboard.png. A table of the cells
    goes to stderr as they finish; --json prints the records on stdout. Finetuning follows the
    protocol of the encoder's method (see advcl finetune --help); --epochs, --limit and
    --eval-limit shorten it for smoke runs (the records say so). CA needs a corruption set:
    digits-c is made offline; CIFAR-10-C / CIFAR-100-C come from --corruptions DIR or
    DATA_DIR/CIFAR-10-C, else CA is skipped with a warning. --limit counts training images;
    --batch-size and --precision are finetuning's (evaluation runs in fp32, --eval-batch-size
    images a batch); --eps is the L-inf budget of the finetuning attacks and of RA. Under
    torchrun every process finetunes and evaluates its share of the test images.

    Example, offline on digits: a smoke run on a CPU (RA by PGD-20: AutoAttack spends seconds
    to minutes of CPU on every image that stays robust, see `advcl eval --help`), then the same
    command prints its table at once:

    \b
      enc=$(advcl pretrain --dataset digits --arch resnet18-tiny --epochs 2 \\
        --batch-size 64 --out runs/bench-encoder)
      advcl benchmark $enc --dataset digits --schemes slf,alf,aff --epochs 3 \\
        --eval-limit 100 --attack pgd20

    The full CIFAR-10 protocol for a published checkpoint, with CIFAR-10-C and the STL-10
    transfer:

    \b
      enc=$(advcl import ACL_DS.pt --from acl)
      advcl benchmark $enc --dataset cifar10 --corruptions /data/CIFAR-10-C
      advcl benchmark $enc --transfer stl10
    """
    from ..settings.layering import resolve
    from ..engine.benchmark import benchmark as run_benchmark
    from ..errors import Interrupted
    from .training import sigterm_as_interrupt

    out = Output(json_output)
    settings = resolve(BenchmarkSettings, options, config_file=config, warn=out.warn)
    values = list(encoders or [])
    if not values or "-" in values:
        lines = stdin_lines("ENCODER", STDIN_HINT)
        values = [p for v in values or ["-"] for p in (lines if v == "-" else [v])]
    reporter = out.reporter()
    paths = [(v, model_path(v, config)) for v in values]
    try:
        with sigterm_as_interrupt():
            result = run_benchmark(settings, paths, reporter, force=force, on_cell=lambda cells: show(out, cells))
    except KeyboardInterrupt:
        raise Interrupted("interrupted", "run the same command again: it continues, keeping the finished cells") from None
    finally:
        reporter.finish()
    if not result.is_main:  # another rank of a torchrun job: rank 0 prints
        return
    out.log(f"wrote {result.leaderboard}" + (f" and {result.chart}" if result.chart else ""))
    if json_output:
        out.document(result.records)
    else:
        out.result(result.results)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _short(name: str) -> str:
    """A path as its last two parts (the run folder and the file), a zoo name as it is."""
    parts = Path(name).parts
    return "/".join(parts[-2:]) if len(parts) > 2 else name


def show(out: Output, cells) -> None:
    """The cells so far as a table on stderr (accuracies in percent)."""
    rows = []
    for c in cells:
        r = c.record or {}
        rows.append({
            "encoder": _short(c.encoder.name), "dataset": c.target.label, "scheme": c.scheme.upper(),
            "SA": _pct(r.get("sa")), "PGD-20": _pct(r.get("pgd20")), "RA": _pct(r.get("ra")), "CA": _pct(r.get("ca")),
            "s": f"{r['seconds']:.0f}" if r else "", "cell": ("cached" if c.cached else "done") if r else "to run",
        })
    done = sum(1 for c in cells if c.record is not None)
    ra = ", ".join(dict.fromkeys(a for c in cells for a in c.evaluation["attacks"]))
    out.log_table(rows, title=f"benchmark: {done}/{len(cells)} cells done (accuracy %; RA: {ra})")


with_options(benchmark, settings_options(BenchmarkSettings))
