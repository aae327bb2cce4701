"""`advcl pull`: a zoo checkpoint into the Hugging Face cache; its path on stdout."""

from typing import Annotated

import typer

from .options import ConfigOpt, EndpointOpt, ManifestOpt
from .output import Output


def pull(
    name: Annotated[
        str, typer.Argument(help="A zoo name (see `advcl zoo list`) or hf:ORG/REPO[@REVISION][:FILE].", show_default=False)
    ],
    endpoint: EndpointOpt = None,
    manifest: ManifestOpt = None,
    force_download: Annotated[
        bool, typer.Option("--force-download", help="Download again even if the file is in the cache.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Download a checkpoint at its pinned revision, check its sha256 and print its local path.

    Files go to the Hugging Face cache (HF_HOME / HF_HUB_CACHE); HF_HUB_OFFLINE=1 uses only
    that cache. hf: names pull straight from a repository, without a pinned sha256.

    Examples, a zoo name, a pipe into eval, a repository through a mirror:

    \b
      advcl pull advcl-r18-cifar10-slf
      advcl pull advcl-r18-cifar10-slf | advcl eval --attack pgd20 --limit 1000
      advcl pull hf:my-lab/advcl-r18-digits@main --endpoint https://hf-mirror.example.org
    """
    from ..settings import HubSettings
    from ..zoo.hub import fetch

    settings = HubSettings.resolve(config, hf_endpoint=endpoint, zoo_manifest=manifest)
    out = Output()
    pulled = fetch(
        name,
        endpoint=settings.hf_endpoint,
        manifest=settings.zoo_manifest,
        force_download=force_download,
        reporter=out.reporter(),
    )
    out.result(pulled.path)
