"""`advcl push`: a checkpoint, its metadata and a model card to the Hub in one commit."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import ConfigOpt, EndpointOpt, JsonOpt, ManifestOpt
from .output import Output


def push(
    ckpt: Annotated[Path, typer.Argument(help="The checkpoint (.safetensors) to publish.", show_default=False)],
    repo: Annotated[str, typer.Option("--repo", help="Hub repository ORG/NAME (created if needed).", show_default=False)],
    zoo_entry: Annotated[
        Optional[str],
        typer.Option("--zoo-entry", help="Write or update this manifest entry with the repo, new revision and sha256.", show_default=False),
    ] = None,
    manifest: ManifestOpt = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be uploaded; send nothing.")] = False,
    license: Annotated[
        Optional[str],
        typer.Option("--license", help="Licence id for the model card (default: the entry's, else mit).", show_default=False),
    ] = None,
    recipe: Annotated[
        Optional[list[str]],
        typer.Option("--recipe", help="A command that reproduces the model (repeatable; default: the entry's recipe).", show_default=False),
    ] = None,
    endpoint: EndpointOpt = None,
    json_mode: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Upload model.safetensors, config.json (the metadata) and a README.md model card in one
    commit, and print the commit sha.

    The token comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`); advcl never
    prints it.

    Example, look first, then publish into a team manifest and use the new entry:

    \b
      advcl push runs/clf.safetensors --repo my-lab/advcl-r18-cifar10-slf --dry-run
      advcl push runs/clf.safetensors --repo my-lab/advcl-r18-cifar10-slf --zoo-entry my-advcl-slf --manifest zoo.toml
      ADVCL_ZOO_MANIFEST=zoo.toml advcl pull my-advcl-slf | advcl eval --attack pgd20
    """
    from ..settings import HubSettings
    from ..zoo.hub import push as push_checkpoint

    settings = HubSettings.resolve(config, hf_endpoint=endpoint, zoo_manifest=manifest)
    out = Output(json_mode)
    result = push_checkpoint(
        ckpt,
        repo,
        endpoint=settings.hf_endpoint,
        manifest=settings.zoo_manifest,
        zoo_entry=zoo_entry,
        private=private,
        dry_run=dry_run,
        license=license,
        recipe=recipe,
        reporter=out.reporter(),
    )
    doc = {
        "repo": result.repo,
        "dry_run": result.dry_run,
        "commit": result.commit,
        "url": result.url,
        "sha256": result.sha256,
        "files": result.files,
        "zoo_entry": result.zoo_entry,
        "manifest": str(result.manifest) if result.manifest else None,
    }
    if json_mode:
        out.document(doc)
    elif dry_run:
        out.table(result.files, ["path", "size", "source"], title=f"would upload to {repo} (dry run)")
        out.log(result.card)
        if zoo_entry:
            out.log(f"would update entry '{zoo_entry}' in {result.manifest}")
    else:
        out.log(result.url or "")
        out.result(result.commit)
