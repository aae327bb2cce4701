"""`advcl pull`: a zoo checkpoint into the Hugging Face cache; its path on stdout."""

from typing import Annotated

import typer

from ..settings import HubSettings
from .options import ConfigOpt, JsonOpt, settings_options, with_options
from .output import Output


def pull(
    name: Annotated[
        str, typer.Argument(help="A zoo name (see `advcl zoo list`) or hf:ORG/REPO[@REVISION][:FILE].", show_default=False)
    ],
    force_download: Annotated[
        bool, typer.Option("--force-download", help="Download again even if the file is in the cache.")
    ] = False,
    json_mode: JsonOpt = False,
    config: ConfigOpt = None,
    **options,
) -> None:
    """Download a checkpoint at its pinned revision, check its sha256 and print its local path
    (with --json: path, sha256, repo, revision, commit, filename and whether the sha256 was
    verified against a pinned one).

    Files go to the Hugging Face cache (HF_HOME / HF_HUB_CACHE); HF_HUB_OFFLINE=1 uses only
    that cache. hf: names pull straight from a repository, without a pinned sha256. The
    repository's config.json is fetched too (the Hub counts downloads by it). A busy Hub (429
    with Retry-After, 5xx, a dropped connection) is retried with back-off; an endpoint that
    cannot be reached fails at once.

    Examples, a zoo name, a pipe into eval, a repository through a mirror:

    \b
      advcl pull advcl-r18-cifar10-slf
      advcl pull advcl-r18-cifar10-slf | advcl eval --attack pgd20 --limit 1000
      advcl pull hf:my-lab/advcl-r18-digits@main \\
        --endpoint https://hf-mirror.example.org --json
    """
    from ..settings.layering import resolve
    from ..zoo.hub import fetch

    out = Output(json_mode)
    settings = resolve(HubSettings, options, config_file=config, warn=out.warn)
    pulled = fetch(
        name,
        endpoint=settings.hf_endpoint,
        manifest=settings.zoo_manifest,
        force_download=force_download,
        reporter=out.reporter(),
    )
    if not json_mode:
        out.result(pulled.path)
        return
    target = pulled.target
    out.document({
        "name": name,
        "path": str(pulled.path),
        "sha256": pulled.sha256,
        "verified": pulled.verified,
        "repo": target.repo,
        "revision": target.revision,
        "commit": pulled.commit,
        "filename": target.filename,
        "config": str(pulled.config) if pulled.config else None,
    })


with_options(pull, settings_options(HubSettings))
