"""The model card pushed with a checkpoint, built from its metadata with huggingface_hub's ModelCard.

A card advcl writes ends with a seal, ``<!-- advcl-card sha256:... -->``, the digest of the text
above it. ``advcl push`` rewrites a card only while its seal still matches (nobody edited it on
the Hub since) or with ``--overwrite-card``; any other README.md is kept.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from ..settings import format_eps
from .hubspec import HUB_DATASETS
from .manifest import METRIC_NAMES

PAPER = "https://arxiv.org/abs/2111.01124"
PAPER_TITLE = (
    "Fan et al., When Does Contrastive Learning Preserve Adversarial Robustness from Pretraining to "
    "Finetuning?, NeurIPS 2021"
)
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10"}
PENDING_REVISION = "COMMIT"  # in a dry run's card: the commit is known only once the files are pushed
_SEAL = re.compile(r"\n<!-- advcl-card sha256:([0-9a-f]{64}) -->\n?\Z")
# Checkpoint metrics are fractions on the test split (engine.finetune / engine.evaluate naming);
# the manifest and the card show them as percentages under these names.
CHECKPOINT_METRICS = {"clean_acc": "sa", "pgd20_acc": "pgd20", "autoattack_acc": "aa"}


def test_accuracies(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"sa", "pgd20", "aa"}`` in percent from a checkpoint's test-split fractions."""
    out = {}
    for key, name in CHECKPOINT_METRICS.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
            out[name] = round(100 * value, 4)
    return out


def build_card(
    meta,
    *,
    repo: str,
    sha256: str,
    filename: str,
    license: str,
    recipe: list[str],
    zoo_name: str | None = None,
    revision: str | None = None,
    base_model: str | None = None,
):
    """A ``ModelCard``: YAML metadata (model-index, tags, licence, Hub dataset ids, the parent as
    ``base_model`` when it is on the Hub) and a body with lineage, recipe and a usage snippet
    pinned to ``revision`` (the commit that holds the file)."""
    from huggingface_hub import ModelCard

    metrics = test_accuracies(meta.metrics)
    eps = format_eps(meta.eps) if meta.eps is not None else None
    data = card_data(meta, repo=repo, license=license, metrics=metrics, eps=eps, base_model=base_model)
    lines = [
        f"# {repo}",
        "",
        f"An advcl {meta.kind} checkpoint: method `{meta.method}` on `{meta.dataset}`, architecture "
        f"`{meta.arch}`" + (f", L-inf eps {eps}." if eps else "."),
        f"AdvCL is from [{PAPER_TITLE}]({PAPER}). Inputs are RGB images in [0, 1]; the model has no "
        "normalisation layer to add.",
        "",
        *results_section(metrics, eps, meta.metrics.get("n_eval")),
        "",
        *lineage_section(meta, sha256=sha256, filename=filename, base_model=base_model),
        "",
        *recipe_section(recipe),
        "",
        *use_section(meta, f"hf:{repo}@{revision or PENDING_REVISION}", zoo_name),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def card_data(meta, *, repo: str, license: str, metrics: dict[str, float], eps: str | None, base_model: str | None):
    """The card's YAML metadata: model-index results, tags, licence, Hub dataset, lineage."""
    from huggingface_hub import EvalResult, ModelCardData

    hub_dataset = HUB_DATASETS.get(meta.dataset)
    results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=hub_dataset or meta.dataset,
            dataset_name=DATASET_NAMES.get(meta.dataset, meta.dataset),
            dataset_split="test",
            metric_type=key,
            metric_name=METRIC_NAMES[key],
            metric_value=value,
            metric_config=f"linf-eps-{eps}" if eps else None,
        )
        for key, value in metrics.items()
    ]
    tags = ["adversarial-robustness", "advcl", meta.method] + ([meta.dataset] if meta.dataset in DATASET_NAMES else [])
    lineage = dict(base_model=base_model, base_model_relation="finetune") if base_model else {}
    return ModelCardData(
        license=license,
        library_name="advcl",
        tags=list(dict.fromkeys(tags)),
        datasets=[hub_dataset] if hub_dataset else None,
        pipeline_tag="image-classification" if meta.kind == "classifier" else "image-feature-extraction",
        model_name=repo,
        eval_results=results or None,
        **lineage,
    )


def results_section(metrics: dict[str, float], eps: str | None, n_eval: Any) -> list[str]:
    """## Results: the recorded accuracies in percent, and how they were measured."""
    lines = ["## Results", ""]
    if not metrics:
        return lines + ["No metrics were recorded in this checkpoint."]
    on = f"the first {n_eval} test images" if isinstance(n_eval, int) else "the test split"
    lines += ["| metric | accuracy (%) |", "|---|---|"]
    lines += [f"| {METRIC_NAMES[k]} | {v:.2f} |" for k, v in metrics.items()]
    return lines + [
        "",
        f"Measured by advcl on {on} when the checkpoint was made (PGD-20: eps {eps}, step eps/4, random start;"
        " an image counts as robust only if its clean prediction is right too). The resolved settings are in"
        " `config.json`.",
    ]


def lineage_section(meta, *, sha256: str, filename: str, base_model: str | None) -> list[str]:
    """## Lineage: the file's sha256, its parent's, and the Hub model it was finetuned from."""
    return [
        "## Lineage",
        "",
        f"- `{filename}` sha256: `{sha256}`",
        f"- parent checkpoint sha256: `{meta.parent}`" if meta.parent else "- parent checkpoint: none (trained from scratch)",
        *([f"- finetuned from [{base_model}](https://huggingface.co/{base_model})"] if base_model else []),
    ]


def recipe_section(recipe: list[str]) -> list[str]:
    """## Recipe: the commands that made the checkpoint, when they were given."""
    if recipe:
        return ["## Recipe", "", "```bash", *recipe, "```"]
    return ["## Recipe", "", "No recipe was given; `config.json` holds the settings the checkpoint was made with."]


def use_section(meta, pull_name: str, zoo_name: str | None) -> list[str]:
    """## Use: pull it pinned to its commit, then evaluate (a classifier) or finetune (an encoder)."""
    lines = ["## Use", ""]
    if zoo_name:
        lines += [f"In its advcl zoo manifest this model is `{zoo_name}`; `advcl pull {zoo_name}` pins this exact file by revision and sha256.", ""]
    lines += [
        "Pinned to the commit that holds this file (sha256 above), so later pushes do not change what it pulls:",
        "",
        "```bash",
        f"advcl pull {pull_name}",
        f"advcl eval {pull_name} --attack pgd20" if meta.kind == "classifier" else f"advcl finetune {pull_name} --scheme slf",
        "```",
    ]
    if meta.kind == "classifier":
        lines += [
            "",
            "```python",
            "import advcl_cli",
            f'model = advcl_cli.load_model("{pull_name}")  # nn.Module in eval mode, [0, 1] images',
            "```",
        ]
    return lines


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(card) -> str:
    """The card's text with advcl's seal appended: what push uploads as README.md."""
    text = str(card)
    return f"{text}\n<!-- advcl-card sha256:{_digest(text)} -->\n"


def written_by_advcl(text: str) -> bool:
    """The README.md is a card advcl wrote and nobody changed since (its seal matches)."""
    seal = _SEAL.search(text)
    return seal is not None and _digest(text[: seal.start()]) == seal.group(1)


def pinned_commit(text: str, repo: str) -> str | None:
    """The commit an advcl card's usage snippet pins for ``repo``, if it is one advcl wrote."""
    found = re.search(rf"hf:{re.escape(repo)}@([0-9a-f]{{40}})", text) if written_by_advcl(text) else None
    return found.group(1) if found else None
