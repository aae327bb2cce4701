"""`advcl push`: a checkpoint and its config.json to the Hub in one commit, then its model card."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..settings import HubSettings
from .options import ConfigOpt, JsonOpt, settings_options, with_options
from .output import Output


CkptArg = Annotated[Path, typer.Argument(help="The checkpoint (.safetensors) to publish.", show_default=False)]
RepoOpt = Annotated[str, typer.Option("--repo", help="Hub repository ORG/NAME (created if needed).", show_default=False)]
ZooEntryOpt = Annotated[
    Optional[str],
    typer.Option("--zoo-entry", help="Write or update this manifest entry with the repo, new revision and sha256.", show_default=False),
]
PrivateOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--private/--public",
        help="Visibility of a new repository (default: the account's or organisation's default). An existing "
        "repository is never changed: a mismatch is refused.",
        show_default=False,
    ),
]
MakePrivateOpt = Annotated[
    bool, typer.Option("--make-private", help="Like --private, and switch an existing public repository to private before uploading.")
]
RevisionOpt = Annotated[
    Optional[str],
    typer.Option("--revision", help="Branch to push to (created from main if missing; default main).", show_default=False),
]
CreatePrOpt = Annotated[bool, typer.Option("--create-pr", help="Open a pull request (against --revision) instead of committing to it.")]
OverwriteCardOpt = Annotated[
    bool,
    typer.Option("--overwrite-card", help="Replace README.md on the Hub even if it was edited there (default: keep an edited card)."),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would be uploaded; send nothing.")]
LicenseOpt = Annotated[
    Optional[str],
    typer.Option("--license", help="Licence id from the Hub's list, e.g. mit, apache-2.0, cc-by-4.0 (default: the entry's, else mit).",
                 show_default=False),
]
RecipeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--recipe", help="A command that reproduces the model (repeatable; default: the entry's recipe).", show_default=False),
]


def push(ckpt: CkptArg, repo: RepoOpt, zoo_entry: ZooEntryOpt = None, private: PrivateOpt = None,
         make_private: MakePrivateOpt = False, revision: RevisionOpt = None, create_pr: CreatePrOpt = False,
         overwrite_card: OverwriteCardOpt = False, dry_run: DryRunOpt = False, license: LicenseOpt = None,
         recipe: RecipeOpt = None, json_mode: JsonOpt = False, config: ConfigOpt = None, **options) -> None:
    """Upload model.safetensors and config.json (its metadata) in one commit, then a README.md
    model card pinned to that commit, and print the commit sha.

    Nothing private is sent: absolute paths, the user, home and host names in the checkpoint's
    metadata are cut to base names or dropped (the upload is then a copy with its own sha256).
    The card's metadata is checked as the Hub would before anything is sent. A card edited on
    the Hub is kept unless --overwrite-card. Transient Hub errors (429, 5xx, dropped
    connections) are retried with back-off. The token comes from huggingface_hub's usual places
    (HF_TOKEN, `hf auth login`); advcl never prints it.

    Example, look first, publish privately into a team manifest, use the new entry, then
    propose an update as a pull request:

    \b
      advcl push runs/clf.safetensors --repo my-lab/advcl-r18-cifar10-slf \\
        --dry-run
      advcl push runs/clf.safetensors --repo my-lab/advcl-r18-cifar10-slf \\
        --private --zoo-entry my-advcl-slf --manifest zoo.toml
      ADVCL_ZOO_MANIFEST=zoo.toml advcl pull my-advcl-slf \\
        | advcl eval --attack pgd20
      advcl push runs/clf2.safetensors --repo my-lab/advcl-r18-cifar10-slf \\
        --create-pr --license apache-2.0
    """
    from ..settings.layering import resolve
    from ..zoo.publish import push as push_checkpoint

    out = Output(json_mode)
    settings = resolve(HubSettings, options, config_file=config, warn=out.warn)
    result = push_checkpoint(
        ckpt,
        repo,
        endpoint=settings.hf_endpoint,
        manifest=settings.zoo_manifest,
        zoo_entry=zoo_entry,
        private=private,
        make_private=make_private,
        revision=revision,
        create_pr=create_pr,
        overwrite_card=overwrite_card,
        dry_run=dry_run,
        license=license,
        recipe=recipe,
        reporter=out.reporter(),
    )
    if json_mode:
        out.document(push_document(result))
    elif dry_run:
        out.table(result.files, ["path", "size", "source"], title=f"would upload to {repo}@{result.revision} (dry run)")
        out.log(result.card)
        if zoo_entry:
            out.log(f"would update entry '{zoo_entry}' in {result.manifest}")
    else:
        out.log(result.pr_url or result.url or "")
        out.result(result.commit)


def push_document(result) -> dict:
    """The --json document of a push (``zoo.publish.Pushed``)."""
    return {
        "repo": result.repo,
        "revision": result.revision,
        "dry_run": result.dry_run,
        "commit": result.commit,
        "url": result.url,
        "pr_url": result.pr_url,
        "private": result.private,
        "card": result.card_action,
        "card_commit": result.card_commit,
        "sha256": result.sha256,
        "public_fields": result.public_fields,
        "files": result.files,
        "zoo_entry": result.zoo_entry,
        "manifest": str(result.manifest) if result.manifest else None,
    }


with_options(push, settings_options(HubSettings))
