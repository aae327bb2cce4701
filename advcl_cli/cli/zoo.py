"""`advcl zoo list` and `advcl zoo info NAME`: what the manifest holds; no network."""

from typing import Annotated

import typer

from ..settings import HubSettings
from .options import ConfigOpt, JsonOpt, settings_options, with_options
from .output import Output

LIST_LABELS = {"sa": "SA", "pgd20": "PGD-20", "aa": "AA"}  # short headers: the table fits 80 columns

app = typer.Typer(
    help=(
        "The model zoo: named checkpoints on the Hugging Face Hub (see also `advcl pull`).\n\n"
        "Example:\n\n"
        "  advcl zoo list\n\n"
        "  advcl zoo info advcl-r18-cifar10-slf --json"
    ),
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
)


MANIFEST_OPTIONS = settings_options(HubSettings, exclude=("hf_endpoint",))


def _manifest(options, config):
    from ..settings.layering import resolve
    from ..zoo.manifest import load_manifest, manifest_path

    settings = resolve(HubSettings, options, config_file=config, warn=Output().warn)
    return load_manifest(manifest_path(settings.zoo_manifest))


def _entry_doc(entry) -> dict:
    """An entry as JSON: accuracies as fractions, as every other verb's JSON and the checkpoints
    hold them (the manifest file and the tables keep the papers' percent)."""
    doc = entry.model_dump(mode="json")
    for metric in doc["metrics"].values():
        metric["value"] = round(metric["value"] / 100, 6)
    return doc


def _eps(entry) -> str:
    from ..settings import format_eps

    return format_eps(entry.eps) if entry.eps is not None else "-"


@app.command("list")
def list_entries(json_mode: JsonOpt = False, config: ConfigOpt = None, **options) -> None:
    """List the zoo's models and their accuracies (percent in the table, fractions with --json,
    as every verb's JSON): reported by a paper, or measured here (marked *). `advcl zoo info
    NAME` shows each number's source.

    Examples:

    \b
      advcl zoo list
      advcl zoo list --json --manifest team-zoo.toml
    """
    zoo = _manifest(options, config)
    rows, docs = [], []
    for name, entry in zoo.entries.items():
        row = {
            "name": name,
            "kind": entry.scheme or entry.kind,
            "dataset": entry.dataset,
            "hub": "yes" if entry.published else "no",
        }
        for key, label in LIST_LABELS.items():
            m = entry.metrics.get(key)
            row[label] = f"{m.value:.2f}{'' if m.status == 'reported' else '*'}" if m else "-"
        rows.append(row)
        docs.append({"name": name, "published": entry.published, **_entry_doc(entry)})
    columns = ["name", "kind", "dataset", *LIST_LABELS.values(), "hub"]
    Output(json_mode).table(rows, columns, title=f"advcl zoo ({zoo.path}); accuracies in percent at L-inf eps 8/255, * = measured here, else reported", doc=docs)


@app.command("info")
def info(
    name: Annotated[str, typer.Argument(help="A zoo name (see `advcl zoo list`).", show_default=False)],
    json_mode: JsonOpt = False,
    config: ConfigOpt = None,
    **options,
) -> None:
    """Show one entry: where it lives, its metrics and their provenance, its recipe, and whether
    it is in the local Hugging Face cache (with its sha256 checked).

    Examples:

    \b
      advcl zoo info advcl-r18-cifar10-slf
      advcl zoo info advcl-r18-cifar10-slf --json
    """
    from ..zoo.hub import cache_state
    from ..benchmark.reported import load_reported
    from ..zoo.manifest import METRIC_NAMES

    zoo = _manifest(options, config)
    entry = zoo.get(name)
    cache = cache_state(name, entry)
    out = Output(json_mode)
    reported = load_reported().sources
    sources = {m.source: reported[m.source].model_dump() for m in entry.metrics.values() if m.source in reported}
    if json_mode:
        out.document({"name": name, "manifest": str(zoo.path), "published": entry.published, **_entry_doc(entry),
                      "sources": sources, "cache": cache})
        return
    if not entry.published:
        where = "not published (no repo): reproduce it with the recipe below"
    elif cache["cached"]:
        where = f"in the local cache: {cache['path']} (sha256 {'ok' if cache['sha256_ok'] else 'MISMATCH: pull with --force-download'})"
    else:
        where = "not in the local cache (`advcl pull` downloads it)"
    fields = {
        "kind": entry.kind, "arch": entry.arch, "method": entry.method, "dataset": entry.dataset,
        "scheme": entry.scheme, "eps": _eps(entry), "repo": entry.repo, "revision": entry.revision,
        "filename": entry.filename if entry.published else None, "sha256": entry.sha256,
        "paper": entry.paper, "license": entry.license, "notes": entry.notes, "local copy": where,
    }
    out.table([{"field": k, "value": v} for k, v in fields.items() if v is not None], ["field", "value"], title=name)
    if entry.metrics:
        rows = [
            {"metric": METRIC_NAMES[k], "value": f"{m.value:.2f}", "status": m.status, "source / command": f"{m.source} ({sources[m.source]['url']})" if m.source in sources
                                  else m.source or m.command}
            for k, m in entry.metrics.items()
        ]
        out.table(rows, ["metric", "value", "status", "source / command"], title="metrics (percent, L-inf)")
    if entry.recipe:
        out.result("recipe:")
        for line in entry.recipe:
            out.result(f"  {line}")


with_options(list_entries, MANIFEST_OPTIONS)
with_options(info, MANIFEST_OPTIONS)
