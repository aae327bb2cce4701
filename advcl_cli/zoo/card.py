"""The model card pushed with a checkpoint, built from its metadata with huggingface_hub's ModelCard."""

from __future__ import annotations

from typing import Any

from ..settings import format_eps
from .manifest import METRIC_NAMES

PAPER = "https://arxiv.org/abs/2111.01124"
PAPER_TITLE = (
    "Fan et al., When Does Contrastive Learning Preserve Adversarial Robustness from Pretraining to "
    "Finetuning?, NeurIPS 2021"
)
HUB_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10"}
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
):
    """A ``ModelCard``: YAML metadata (model-index, tags, licence) and a body with lineage and recipe."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics = test_accuracies(meta.metrics)
    eps = format_eps(meta.eps) if meta.eps is not None else None
    known = meta.dataset in HUB_DATASETS
    n_eval = meta.metrics.get("n_eval")
    results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=meta.dataset,
            dataset_name=HUB_DATASETS.get(meta.dataset, meta.dataset),
            dataset_split="test",
            metric_type=key,
            metric_name=METRIC_NAMES[key],
            metric_value=value,
            metric_config=f"linf-eps-{eps}" if eps else None,
        )
        for key, value in metrics.items()
    ]
    tags = ["adversarial-robustness", "advcl", meta.method] + ([meta.dataset] if known else [])
    data = ModelCardData(
        license=license,
        library_name="advcl",
        tags=list(dict.fromkeys(tags)),
        datasets=[meta.dataset] if known else None,
        pipeline_tag="image-classification" if meta.kind == "classifier" else "image-feature-extraction",
        model_name=repo,
        eval_results=results or None,
    )
    pull_name = f"hf:{repo}"
    lines = [
        f"# {repo}",
        "",
        f"An advcl {meta.kind} checkpoint: method `{meta.method}` on `{meta.dataset}`, architecture "
        f"`{meta.arch}`" + (f", L-inf eps {eps}." if eps else "."),
        f"AdvCL is from [{PAPER_TITLE}]({PAPER}). Inputs are RGB images in [0, 1]; the model has no "
        "normalisation layer to add.",
        "",
        "## Results",
        "",
    ]
    if metrics:
        on = f"the first {n_eval} test images" if isinstance(n_eval, int) else "the test split"
        lines += ["| metric | accuracy (%) |", "|---|---|"]
        lines += [f"| {METRIC_NAMES[k]} | {v:.2f} |" for k, v in metrics.items()]
        lines += [
            "",
            f"Measured by advcl on {on} when the checkpoint was made (PGD-20: eps {eps}, step eps/4, random start;"
            " an image counts as robust only if its clean prediction is right too). The resolved settings are in"
            " `config.json`.",
        ]
    else:
        lines += ["No metrics were recorded in this checkpoint."]
    lines += [
        "",
        "## Lineage",
        "",
        f"- `{filename}` sha256: `{sha256}`",
        f"- parent checkpoint sha256: `{meta.parent}`" if meta.parent else "- parent checkpoint: none (trained from scratch)",
        "",
        "## Recipe",
        "",
    ]
    if recipe:
        lines += ["```bash", *recipe, "```"]
    else:
        lines += ["No recipe was given; `config.json` holds the settings the checkpoint was made with."]
    lines += [
        "",
        "## Use",
        "",
        *(
            [f"In its advcl zoo manifest this model is `{zoo_name}`; `advcl pull {zoo_name}` pins this exact file by revision and sha256.", ""]
            if zoo_name
            else []
        ),
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
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
