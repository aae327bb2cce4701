"""Pull and push checkpoints through huggingface_hub, with pinned revisions and sha256 checks.

Downloads go to the standard Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), read at call
time, as are ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``: huggingface_hub itself reads them once at
import, which would ignore a change made later in the same process. Every failure of the Hub
client becomes an ``AdvclError`` with a one-line message; nothing here prints, and the token is
never read, printed or logged by advcl (huggingface_hub finds it in its usual places).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.report import Reporter
from ..errors import AdvclError, CheckpointError, DownloadError, UsageError
from .manifest import (
    NAME_RE,
    SHIPPED,
    Entry,
    Manifest,
    load_manifest,
    manifest_path,
    render_manifest,
    validate_entry,
    write_manifest,
)

HF_PREFIX = "hf:"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_FILENAME = "model.safetensors"
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PLACEHOLDER_REVISION = "0" * 40  # stands for the commit while an entry is checked before pushing
_CONNECTION_ERRORS = {"TransportError", "ConnectError", "ConnectionError", "TimeoutException", "Timeout", "ProxyError"}


@dataclass
class Target:
    """One file to fetch: from a manifest entry (pinned) or an ``hf:`` name (not pinned)."""

    label: str
    repo: str
    revision: str
    filename: str
    sha256: str | None = None
    entry: Entry | None = None


@dataclass
class Pulled:
    path: Path
    sha256: str
    target: Target


@dataclass
class Pushed:
    repo: str
    sha256: str
    files: list[dict]
    card: str
    dry_run: bool
    commit: str | None = None
    url: str | None = None
    zoo_entry: str | None = None
    manifest: Path | None = None
    entry: Entry | None = field(default=None, repr=False)


# --- environment, read at call time ------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now or was set when huggingface_hub loaded."""
    from huggingface_hub import constants

    env = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def endpoint_of(explicit: str | None) -> str:
    """``--endpoint`` / ADVCL_HF_ENDPOINT (already in ``explicit``) > HF_ENDPOINT > the Hub."""
    return (explicit or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub computes it, from the environment now."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


# --- names ---------------------------------------------------------------------------------


def parse_hf_name(name: str) -> Target:
    """``hf:ORG/REPO[@REVISION][:FILE]`` (revision default main, file default model.safetensors)."""
    spec, _, filename = name[len(HF_PREFIX):].partition(":")
    repo, at, revision = spec.partition("@")
    if not REPO_RE.match(repo) or (at and not revision):
        raise UsageError(f"bad Hub name '{name}'", "write hf:ORG/REPO[@REVISION][:FILE], e.g. hf:me/advcl-r18@main")
    return Target(name, repo, revision or "main", filename or DEFAULT_FILENAME)


def unpublished_error(name: str, entry: Entry) -> UsageError:
    recipe = "\n".join(f"  {line}" for line in entry.recipe) or "  (no recipe in the manifest)"
    return UsageError(
        f"'{name}' is not published yet (its manifest entry has no repo)",
        f"reproduce it with:\n{recipe}",
    )


def resolve_target(name: str, manifest: Path | None) -> Target:
    if name.startswith(HF_PREFIX):
        return parse_hf_name(name)
    entry = load_manifest(manifest).get(name)
    if not entry.published:
        raise unpublished_error(name, entry)
    return Target(name, entry.repo, entry.revision, entry.filename, entry.sha256, entry)


# --- errors --------------------------------------------------------------------------------


def _is_connection_error(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, ConnectionError) or any(c.__name__ in _CONNECTION_ERRORS for c in type(e).__mro__):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def unreachable(endpoint: str) -> DownloadError:
    return DownloadError(
        f"cannot reach {endpoint}",
        "check the network; use --endpoint URL or ADVCL_HF_ENDPOINT for a mirror, or HF_HUB_OFFLINE=1 to use the local cache only",
    )


def hub_error(e: Exception, endpoint: str, repo: str, revision: str | None = None, filename: str | None = None) -> AdvclError:
    """A huggingface_hub / HTTP failure as a one-line AdvclError."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, AdvclError):
        return e
    if isinstance(e, GatedRepoError):
        return UsageError(f"{repo} on {endpoint} is gated", "accept its conditions on the Hub and log in (hf auth login or HF_TOKEN)")
    if isinstance(e, RepositoryNotFoundError):
        return UsageError(
            f"repository {repo} not found on {endpoint}",
            "check the name; a private repository needs a token (hf auth login or HF_TOKEN)",
        )
    if isinstance(e, RevisionNotFoundError):
        return UsageError(f"revision {revision} not found in {repo} on {endpoint}", "check the pinned revision (a commit of that repository)")
    if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
        return UsageError(f"file {filename} not found in {repo}@{revision} on {endpoint}")
    if isinstance(e, OfflineModeIsEnabled):
        return DownloadError("HF_HUB_OFFLINE=1 is set, and this needs the network", "unset HF_HUB_OFFLINE")
    if _is_connection_error(e):
        return unreachable(endpoint)
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        hint = "log in with `hf auth login` or set HF_TOKEN (a token with write access)" if status in (401, 403) else None
        detail = f": {e.server_message.strip()}" if getattr(e, "server_message", None) else ""
        return DownloadError(f"{endpoint} answered HTTP {status} for {repo}{detail}", hint)
    return DownloadError(f"Hub request for {repo} failed: {type(e).__name__}: {e}")


# --- pull ----------------------------------------------------------------------------------


def cached_file(target: Target) -> Path | None:
    """The file in the local cache at the target's revision, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(target.repo, target.filename, cache_dir=hub_cache_dir(), revision=target.revision)
    return Path(found) if isinstance(found, str) else None


def download(target: Target, endpoint: str, force_download: bool = False) -> Path:
    """The file in the Hugging Face cache, downloaded if needed; errors mapped."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .. import __version__

    where = f"'{target.label}' ({target.repo}@{target.revision}:{target.filename})"
    common = dict(
        repo_id=target.repo,
        filename=target.filename,
        revision=target.revision,
        cache_dir=hub_cache_dir(),
        endpoint=endpoint,
        library_name="advcl",
        library_version=__version__,
    )
    if offline():
        if force_download:
            raise UsageError("--force-download needs the network, but HF_HUB_OFFLINE=1 is set", "unset HF_HUB_OFFLINE")
        try:
            return Path(hf_hub_download(**common, local_files_only=True))
        except LocalEntryNotFoundError:
            raise DownloadError(
                f"{where} is not in the local cache and HF_HUB_OFFLINE=1 is set",
                "unset HF_HUB_OFFLINE to download it, or point HF_HOME / HF_HUB_CACHE at a cache that has it",
            ) from None
    try:
        if force_download or cached_file(target) is None:
            # One HEAD without retries first: an unreachable endpoint fails at once, not after
            # huggingface_hub's back-off; Hub errors surface with their own codes.
            url = hf_hub_url(target.repo, target.filename, revision=target.revision, endpoint=endpoint)
            get_hf_file_metadata(url, endpoint=endpoint, library_name="advcl", library_version=__version__)
        return Path(hf_hub_download(**common, force_download=force_download))
    except Exception as e:  # huggingface_hub and httpx raise many types: map them all
        if isinstance(e, LocalEntryNotFoundError) and not _is_connection_error(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DownloadError(f"could not download {where} from {endpoint}: {first}", "is the endpoint a Hugging Face Hub (or mirror)?") from None
        raise hub_error(e, endpoint, target.repo, target.revision, target.filename) from None


def fetch(
    name: str,
    *,
    endpoint: str | None = None,
    manifest: str | Path | None = None,
    force_download: bool = False,
    reporter: Reporter | None = None,
) -> Pulled:
    """Pull a zoo entry or ``hf:`` name: download, check the sha256, validate the checkpoint."""
    from ..settings import HubSettings

    reporter = reporter or Reporter()
    settings = HubSettings.resolve(hf_endpoint=endpoint, zoo_manifest=manifest)
    target = resolve_target(name, manifest_path(settings.zoo_manifest))
    ep = endpoint_of(settings.hf_endpoint)
    path = download(target, ep, force_download)
    from ..checkpoint import check_checkpoint, sha256_file  # torch: only once there is a file

    digest = sha256_file(path)
    if target.sha256 is not None and digest != target.sha256:
        hint = (
            "the file at the pinned revision is not the one the manifest names: check its revision and sha256"
            if force_download
            else f"the cached copy may be damaged; `advcl pull {name} --force-download` downloads it again"
        )
        raise DownloadError(
            f"sha256 mismatch for '{name}' ({path}): expected {target.sha256}, got {digest}; nothing was deleted", hint
        )
    try:  # the header is enough (names, shapes, size); whoever uses the file loads the weights
        meta = check_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"'{name}' is not a usable advcl checkpoint: {e.message}", e.hint) from None
    entry = target.entry
    if entry is not None and (meta.kind, meta.arch) != (entry.kind, entry.arch):
        raise CheckpointError(
            f"'{name}' is a {meta.arch} {meta.kind} but the manifest says {entry.arch} {entry.kind}",
            "fix the manifest entry",
        )
    if target.sha256 is not None:
        reporter.log(f"{name}: {target.repo}@{target.revision[:12]}, sha256 verified")
    else:
        reporter.warn(f"{name}: no sha256 pinned for hf: names, none was checked; this file's sha256 is {digest}")
    return Pulled(path=path, sha256=digest, target=target)


# --- push ----------------------------------------------------------------------------------


def writable_manifest(explicit: str | Path | None) -> Path:
    """The manifest ``--zoo-entry`` updates; never the copy inside an installed package, and
    only where it can be written (checked before anything is pushed)."""
    from ..checkpoint import check_writable

    path = manifest_path(explicit)
    real = path.resolve()
    if real == SHIPPED.resolve() and {"site-packages", "dist-packages"} & set(real.parts):
        raise UsageError(
            "--zoo-entry would edit the manifest inside the installed advcl package",
            "pass --manifest FILE (your team's zoo) or set ADVCL_ZOO_MANIFEST",
        )
    check_writable(real)
    return path


def entry_for_push(existing: Entry | None, *, name: str, manifest: Path, repo: str, revision: str, filename: str, sha256: str, meta,
                   license: str, recipe: list[str]) -> Entry:
    """The manifest entry ``name`` for a pushed checkpoint: location, claims from its metadata,
    kept notes; validated as the manifest would be (a UsageError names the field)."""
    from .card import PAPER, test_accuracies

    metrics = dict(existing.metrics) if existing else {}
    verb = "finetune" if meta.kind == "classifier" else "pretrain"
    for key, value in test_accuracies(meta.metrics).items():
        metrics[key] = dict(
            value=value,
            status="measured",
            command=f"advcl {verb} (recorded in the checkpoint when it was made; settings in its config.json)",
        )
    scheme = meta.config.get("scheme") if meta.kind == "classifier" else None
    return validate_entry(name, dict(
        repo=repo,
        revision=revision,
        filename=filename,
        sha256=sha256,
        kind=meta.kind,
        arch=meta.arch,
        method=meta.method,
        dataset=meta.dataset,
        scheme=scheme if scheme in ("slf", "alf", "aff") else None,
        eps=meta.eps,
        metrics=metrics,
        paper=existing.paper if existing else (PAPER if meta.method == "advcl" else None),
        license=license,
        notes=existing.notes if existing else None,
        recipe=recipe,
    ), manifest)


def push(
    ckpt_path: str | Path,
    repo: str,
    *,
    endpoint: str | None = None,
    manifest: str | Path | None = None,
    zoo_entry: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    license: str | None = None,
    recipe: list[str] | None = None,
    reporter: Reporter | None = None,
) -> Pushed:
    """Upload a checkpoint, its metadata and a model card in one commit; optionally pin it in a manifest."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from .. import __version__
    from ..checkpoint import check_checkpoint, sha256_file
    from ..settings import HubSettings
    from .card import build_card

    reporter = reporter or Reporter()
    if not REPO_RE.match(repo):
        raise UsageError(f"bad repository name '{repo}'", "write ORG/NAME, e.g. --repo my-lab/advcl-r18-cifar10")
    if zoo_entry is not None and not NAME_RE.match(zoo_entry):
        raise UsageError(f"bad zoo entry name '{zoo_entry}'", "use lower-case letters, digits, '-', '_' and '.'")
    settings = HubSettings.resolve(hf_endpoint=endpoint, zoo_manifest=manifest)
    ep = endpoint_of(settings.hf_endpoint)
    ckpt_path = Path(ckpt_path)
    meta = check_checkpoint(ckpt_path)  # the whole header (names, shapes, size) before anything is sent
    digest = sha256_file(ckpt_path)

    zoo: Manifest | None = None
    existing = None
    if zoo_entry is not None:
        man_path = writable_manifest(settings.zoo_manifest)
        zoo = load_manifest(man_path) if man_path.exists() else Manifest(man_path, {})
        existing = zoo.entries.get(zoo_entry)
    license = license or (existing.license if existing and existing.license else "mit")
    recipe = list(recipe or (existing.recipe if existing else []))

    def pin(revision: str) -> Entry:
        return entry_for_push(existing, name=zoo_entry, manifest=zoo.path, repo=repo, revision=revision, filename=DEFAULT_FILENAME,
                              sha256=digest, meta=meta, license=license, recipe=recipe)

    if zoo is not None:  # the entry and the manifest must be right before the commit, not after
        zoo.entries[zoo_entry] = pin(PLACEHOLDER_REVISION)
        render_manifest(zoo)
    card = str(build_card(meta, repo=repo, sha256=digest, filename=DEFAULT_FILENAME, license=license, recipe=recipe, zoo_name=zoo_entry))
    config = (json.dumps(meta.model_dump(mode="json"), indent=2) + "\n").encode()
    files = [
        {"path": DEFAULT_FILENAME, "size": ckpt_path.stat().st_size, "source": str(ckpt_path)},
        {"path": "config.json", "size": len(config), "source": "checkpoint metadata"},
        {"path": "README.md", "size": len(card.encode()), "source": "model card"},
    ]
    result = Pushed(repo=repo, sha256=digest, files=files, card=card, dry_run=dry_run, zoo_entry=zoo_entry, manifest=zoo.path if zoo else None)
    if dry_run:
        return result
    if offline():
        raise DownloadError("push needs the network, but HF_HUB_OFFLINE=1 is set", "unset HF_HUB_OFFLINE")

    api = HfApi(endpoint=ep, library_name="advcl", library_version=__version__)
    operations = [
        CommitOperationAdd(path_in_repo=DEFAULT_FILENAME, path_or_fileobj=str(ckpt_path)),
        CommitOperationAdd(path_in_repo="config.json", path_or_fileobj=config),
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()),
    ]
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.create_commit(
            repo,
            operations=operations,
            commit_message=f"advcl push: {meta.method} {meta.kind} on {meta.dataset} (sha256 {digest[:12]})",
        )
    except Exception as e:  # map every client failure to one line
        raise hub_error(e, ep, repo) from None
    result.commit, result.url = info.oid, info.commit_url
    reporter.log(f"pushed {ckpt_path} to {repo}@{info.oid}")
    if zoo is not None:
        zoo.entries[zoo_entry] = entry = pin(info.oid)
        write_manifest(zoo)
        result.entry = entry
        reporter.log(f"manifest {zoo.path}: entry '{zoo_entry}' now pins {repo}@{info.oid}")
    return result
