"""Talking to the Hub through huggingface_hub: names, errors, retries, and pulling checkpoints.

Downloads go to the standard Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), read at call
time, as are ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``: huggingface_hub itself reads them once at
import, which would ignore a change made later in the same process. Every call to the Hub goes
through ``retrying``: a 429 (after its Retry-After), a 5xx or a dropped connection is retried
with huggingface_hub's back-off (1, 2, 4, 8, 8 s), while a refused connection or an unknown host
fails at once. Every failure of the client becomes an ``AdvclError`` with a one-line message;
nothing here prints, and the token is never read, printed or logged by advcl (huggingface_hub
finds it in its usual places). Pushing lives in ``publish.py``.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from ..report import Reporter
from ..errors import AdvclError, CheckpointError, DownloadError, UsageError
from ..settings import parse_url
from ..version import __version__
from .hubspec import filename_problem, repo_id_problem
from .manifest import Entry, load_manifest, manifest_path

HF_PREFIX = "hf:"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"
HEX40 = re.compile(r"^[0-9a-f]{40}$")
_CONNECTION_ERRORS = {"TransportError", "ConnectError", "ConnectionError", "TimeoutException", "Timeout", "ProxyError"}
T = TypeVar("T")


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
    config: Path | None = None  # the repo's config.json at the same revision, when it has one

    @property
    def verified(self) -> bool:
        """The file's sha256 was checked against a pinned one (zoo names), not only computed."""
        return self.target.sha256 is not None

    @property
    def commit(self) -> str | None:
        """The commit the file came from (its snapshot folder in the cache)."""
        name = self.path.parent.name
        return name if HEX40.match(name) else None


# --- environment, read at call time ------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now or was set when huggingface_hub loaded."""
    from huggingface_hub import constants

    env = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def endpoint_of(explicit: str | None = None) -> str:
    """``explicit`` (the CLI's ``--endpoint`` or ``[hub] hf_endpoint``) > ADVCL_HF_ENDPOINT >
    HF_ENDPOINT > the Hub; the environment is read now, as huggingface_hub reads HF_ENDPOINT."""
    value, where = (explicit, "endpoint") if explicit else (os.environ.get("ADVCL_HF_ENDPOINT"), "ADVCL_HF_ENDPOINT")
    if value:
        try:
            return parse_url(value)
        except ValueError as e:
            raise UsageError(f"bad value for {where}: {e}") from None
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


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
    problem = repo_id_problem(repo) or (at and not revision and "the revision after '@' is empty") or (
        filename and filename_problem(filename))
    if problem:
        raise UsageError(f"bad Hub name '{name}': {problem}", "write hf:ORG/REPO[@REVISION][:FILE], e.g. hf:me/advcl-r18@main")
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


# --- retries -------------------------------------------------------------------------------

# huggingface_hub's http_backoff: these statuses, 5 retries, waits of 1 s doubling to 8 s; a
# Retry-After longer than a minute is not waited for (the error says how long the Hub asked).
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
MAX_RETRIES = 5
FIRST_WAIT, MAX_WAIT, MAX_RETRY_AFTER = 1.0, 8.0, 60.0
# A connection that broke after it was made is worth retrying; one that was never made (refused,
# unknown host, connect timeout) is not: the endpoint is down or wrong, and waiting hides that.
_DROPPED = {
    "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError", "RemoteProtocolError", "ReadError",
    "WriteError", "ReadTimeout", "WriteTimeout", "ChunkedEncodingError", "ProtocolError", "IncompleteRead",
    "RemoteDisconnected",
}
_NEVER_CONNECTED = {
    "ConnectionRefusedError", "gaierror", "ConnectError", "NewConnectionError", "NameResolutionError",
    "ConnectTimeout", "ConnectTimeoutError",
}
_sleep = time.sleep  # tests replace it


def _related(e: BaseException):
    """``e`` and the exceptions behind it: causes, contexts, and those that requests/urllib3
    keep in ``reason`` or ``args``."""
    todo, seen = [e], set()
    while todo and len(seen) < 20:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:  # urllib keeps a string in `reason`
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ())]


def retry_after(response) -> float | None:
    """The seconds a response's Retry-After header asks for (an HTTP date is not supported, as in
    huggingface_hub)."""
    value = (getattr(response, "headers", None) or {}).get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def transient(e: BaseException) -> tuple[str, float | None] | None:
    """Why ``e`` is worth retrying and the wait the server asked for, or None if it is not."""
    if isinstance(e, AdvclError):
        return None
    chain = list(_related(e))
    for x in chain:
        response = getattr(x, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return (f"HTTP {status}", retry_after(response)) if status in RETRY_STATUSES else None
    names = {c.__name__ for x in chain for c in type(x).__mro__}
    if names & _NEVER_CONNECTED or any(isinstance(x, socket.gaierror) for x in chain):
        return None
    dropped = names & _DROPPED
    return (f"connection dropped ({sorted(dropped)[0]})", None) if dropped else None


def retrying(call: Callable[[], T], what: str, reporter: Reporter) -> T:
    """``call()``, retried on transient failures (see ``transient``), with a warning for each."""
    wait = FIRST_WAIT
    for attempt in range(1, MAX_RETRIES + 2):
        try:
            return call()
        except Exception as e:
            verdict = transient(e)
            if verdict is None or attempt > MAX_RETRIES:
                raise
            reason, asked = verdict
            delay = wait if asked is None else asked
            if delay > MAX_RETRY_AFTER:
                raise
            reporter.warn(f"{what}: {reason}, retrying in {delay:g} s ({attempt}/{MAX_RETRIES})")
            _sleep(delay)
            wait = min(MAX_WAIT, wait * 2)
    raise AssertionError("unreachable")  # pragma: no cover


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
        if status == 429:
            asked = retry_after(e.response)
            hint = (f"the Hub asks to wait {asked:g} s" if asked else "wait a minute") + ", then try again (logged-in users get higher limits)"
        elif status in RETRY_STATUSES:
            hint = f"tried {MAX_RETRIES + 1} times; the Hub may be down or overloaded: try again later"
        detail = f": {e.server_message.strip()}" if getattr(e, "server_message", None) else ""
        return DownloadError(f"{endpoint} answered HTTP {status} for {repo}{detail}", hint)
    return DownloadError(f"Hub request for {repo} failed: {type(e).__name__}: {e}")


# --- pull ----------------------------------------------------------------------------------


def cached_file(target: Target) -> Path | None:
    """The file in the local cache at the target's revision, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(target.repo, target.filename, cache_dir=hub_cache_dir(), revision=target.revision)
    return Path(found) if isinstance(found, str) else None


def _download_args(target: Target, endpoint: str, filename: str) -> dict:
    return dict(
        repo_id=target.repo,
        filename=filename,
        revision=target.revision,
        cache_dir=hub_cache_dir(),
        endpoint=endpoint,
        library_name="advcl",
        library_version=__version__,
    )


def cache_state(name: str, entry: Entry) -> dict:
    """Whether a manifest entry's file is in the local cache and matches its pinned sha256:
    ``{"cached", "path", "sha256_ok"}`` (no network)."""
    state = {"cached": False, "path": None, "sha256_ok": None}
    if entry.published:
        from ..checkpoint import sha256_file  # imports torch: only for a cached file

        path = cached_file(Target(name, entry.repo, entry.revision, entry.filename, entry.sha256, entry))
        if path is not None:
            state = {"cached": True, "path": str(path), "sha256_ok": sha256_file(path) == entry.sha256}
    return state


def download(target: Target, endpoint: str, force_download: bool = False, reporter: Reporter | None = None) -> Path:
    """The file in the Hugging Face cache, downloaded if needed; errors mapped."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import LocalEntryNotFoundError

    reporter = reporter or Reporter()
    where = f"'{target.label}' ({target.repo}@{target.revision}:{target.filename})"
    common = _download_args(target, endpoint, target.filename)
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
            # One HEAD first, through `retrying`: a dead endpoint fails at once (huggingface_hub
            # backs off on a refused connection too), a busy one is waited for, and Hub errors
            # surface with their own codes.
            url = hf_hub_url(target.repo, target.filename, revision=target.revision, endpoint=endpoint)
            retrying(lambda: get_hf_file_metadata(url, endpoint=endpoint, library_name="advcl", library_version=__version__),
                     f"HEAD {target.repo}/{target.filename}", reporter)
        return Path(retrying(lambda: hf_hub_download(**common, force_download=force_download), f"download of {where}", reporter))
    except Exception as e:  # huggingface_hub and httpx raise many types: map them all
        if isinstance(e, LocalEntryNotFoundError) and not _is_connection_error(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DownloadError(f"could not download {where} from {endpoint}: {first}", "is the endpoint a Hugging Face Hub (or mirror)?") from None
        raise hub_error(e, endpoint, target.repo, target.revision, target.filename) from None


def download_config(target: Target, endpoint: str, reporter: Reporter) -> Path | None:
    """The repo's config.json at the target's revision, or None if it has none. The Hub counts a
    library's downloads by the requests for this file (as for timm), so every pull asks for it;
    a failure here is only a warning: the checkpoint is already verified."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    args = _download_args(target, endpoint, CONFIG_FILENAME)
    try:
        if offline():
            return Path(hf_hub_download(**args, local_files_only=True))
        return Path(retrying(lambda: hf_hub_download(**args), f"download of {target.repo}/{CONFIG_FILENAME}", reporter))
    except EntryNotFoundError:  # none in the repo, or (LocalEntryNotFoundError) none in the offline cache
        return None
    except Exception as e:
        reporter.warn(f"{target.label}: {CONFIG_FILENAME} not fetched: {hub_error(e, endpoint, target.repo, target.revision, CONFIG_FILENAME)}")
        return None


def fetch(
    name: str,
    *,
    endpoint: str | None = None,
    manifest: str | Path | None = None,
    force_download: bool = False,
    reporter: Reporter | None = None,
) -> Pulled:
    """Pull a zoo entry or ``hf:`` name: download, check the sha256, validate the checkpoint,
    and fetch its config.json at the same revision."""

    reporter = reporter or Reporter()
    target = resolve_target(name, manifest_path(manifest))
    ep = endpoint_of(endpoint)
    path = download(target, ep, force_download, reporter)
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
    return Pulled(path=path, sha256=digest, target=target, config=download_config(target, ep, reporter))
