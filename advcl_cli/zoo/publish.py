"""Push a checkpoint to the Hub: weights and config.json in one commit, then its model card.

Before anything is sent: the checkpoint's header is validated; its metadata is made public
(``private.py``: no absolute paths, user, home or host names; if that changes anything, the
uploaded file is a copy with the cleaned metadata and its own sha256, the local file is left
alone); the card's metadata is checked as the Hub would (``hubspec.py``); a ``--zoo-entry`` is
rendered. Then, each Hub call through ``hub.retrying``:

1. the repository's state: does it exist, is it private, does the branch exist, its README.md;
2. visibility as the user meant it: a new repository gets ``private`` only if ``--private`` or
   ``--public`` was given (else the account's default, which an organisation may set to
   private); an existing public repository is never made private silently: ``--private`` is
   refused unless ``--make-private`` switches it first; ``--public`` on a private one is refused;
3. the files commit (to ``--revision`` BRANCH, created from main if missing, or as a new pull
   request with ``--create-pr``) of one snapshot of the checkpoint's bytes (hashed and uploaded
   as one), the Hub's LFS oid of it checked against that sha256, then the manifest entry
   pinned to it;
4. the card, in a second commit, with a usage snippet pinned to the files commit. A README.md on
   the Hub is rewritten only if advcl wrote it and nobody edited it since, or with
   ``--overwrite-card``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..report import Reporter
from ..errors import AdvclError, DownloadError, UsageError
from ..settings import SCHEME_NAMES
from ..version import __version__
from .card import PAPER, build_card, pinned_commit, sealed, test_accuracies, written_by_advcl
from .hub import DEFAULT_FILENAME, endpoint_of, hub_cache_dir, hub_error, offline, retrying
from .hubspec import check_license, repo_id_problem, validate_card_data
from .manifest import NAME_RE, SHIPPED, Entry, Manifest, load_manifest, manifest_path, render_manifest, validate_entry, write_manifest
from .private import private_in_text, public_metadata

README = "README.md"
CONFIG = "config.json"
PLACEHOLDER_REVISION = "0" * 40  # stands for the commit while an entry is checked before pushing
BRANCH_RE = re.compile(r"^(refs/pr/\d+|[A-Za-z0-9][\w.-]*(/[\w.-]+)*)$")


@dataclass
class Pushed:
    repo: str
    sha256: str
    files: list[dict]
    card: str
    dry_run: bool
    revision: str = "main"
    commit: str | None = None
    url: str | None = None
    card_commit: str | None = None
    card_action: str = "write"  # write | kept | unchanged
    pr_url: str | None = None
    private: bool | None = None
    public_fields: list[str] = field(default_factory=list)
    zoo_entry: str | None = None
    manifest: Path | None = None
    entry: Entry | None = field(default=None, repr=False)


@dataclass
class RepoState:
    exists: bool
    private: bool | None = None
    branch_exists: bool = False
    head: str | None = None  # the branch's commit before the push
    card: str | None = None  # README.md at the branch (or main if the branch is new), if any


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
        scheme=scheme if scheme in SCHEME_NAMES else None,
        eps=meta.eps,
        metrics=metrics,
        paper=existing.paper if existing else (PAPER if meta.method == "advcl" else None),
        license=license,
        notes=existing.notes if existing else None,
        recipe=recipe,
    ), manifest)


def hub_model_of(sha256: str | None, manifests: list[Path]) -> str | None:
    """The Hub repository a checkpoint with this sha256 came from, if this machine knows: a
    published manifest entry pins it, or it sits in the Hugging Face cache (which names an LFS
    file's blob by its sha256)."""
    if not sha256:
        return None
    for path in manifests:
        try:
            entries = load_manifest(path).entries.values() if path.exists() else []
        except UsageError:  # a broken manifest is reported where it is used, not here
            entries = []
        for entry in entries:
            if entry.sha256 == sha256 and entry.repo:
                return entry.repo
    for blob in sorted(hub_cache_dir().glob(f"models--*/blobs/{sha256}")):
        org, sep, name = blob.parent.parent.name.removeprefix("models--").partition("--")
        if sep and repo_id_problem(f"{org}/{name}") is None:
            return f"{org}/{name}"
    return None


def _check_names(repo: str, zoo_entry: str | None, revision: str | None, private: bool | None, make_private: bool, create_pr: bool) -> None:
    problem = repo_id_problem(repo)
    if problem:
        raise UsageError(f"bad repository name '{repo}': {problem}", "write ORG/NAME, e.g. --repo my-lab/advcl-r18-cifar10")
    if zoo_entry is not None and not NAME_RE.match(zoo_entry):
        raise UsageError(f"bad zoo entry name '{zoo_entry}'", "use lower-case letters, digits, '-', '_' and '.'")
    if revision is not None and (not BRANCH_RE.match(revision) or re.fullmatch(r"[0-9a-f]{40}", revision)):
        raise UsageError(f"bad --revision '{revision}': push to a branch name (or refs/pr/N)", "e.g. --revision main or --revision v1")
    if create_pr and revision is not None and revision.startswith("refs/pr/"):
        raise UsageError("--create-pr opens a pull request against a branch, not against refs/pr/N")
    if make_private and private is False:
        raise UsageError("--make-private and --public contradict each other")


def _card_recipe(recipe: list[str]) -> list[str]:
    """The recipe lines, refused if one names a local path, the user or the machine."""
    for i, line in enumerate(recipe, 1):
        found = private_in_text(line)
        if found:
            raise UsageError(
                f"recipe line {i} names {found}, and the model card is public",
                "write paths relative to the run (runs/enc.safetensors) or as variables ($enc)",
            )
    return recipe


def remote_state(api, repo: str, revision: str, endpoint: str, cache: Path, reporter: Reporter) -> RepoState:
    """What the Hub has: the repository, its visibility, the branch and its README.md."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    def info(rev: str):
        return retrying(lambda: api.model_info(repo, revision=rev), f"model_info {repo}@{rev}", reporter)

    try:
        found, branch_exists = info(revision), True
    except RepositoryNotFoundError:
        return RepoState(exists=False)
    except RevisionNotFoundError:
        found, branch_exists = info("main"), False
    files = {s.rfilename for s in (found.siblings or [])}
    card = None
    if README in files:
        path = retrying(lambda: hf_hub_download(repo, README, revision=found.sha, endpoint=endpoint, cache_dir=cache),
                        f"download of {repo}/{README}", reporter)
        card = Path(path).read_text(encoding="utf-8", errors="replace")
    return RepoState(exists=True, private=bool(found.private), branch_exists=branch_exists, head=found.sha if branch_exists else None,
                     card=card)


def settle_visibility(api, repo: str, state: RepoState, private: bool | None, make_private: bool, reporter: Reporter) -> bool:
    """Create the repository or check (and with --make-private change) its visibility; whether
    it is private now."""
    if not state.exists:
        retrying(lambda: api.create_repo(repo, private=private, exist_ok=True), f"create_repo {repo}", reporter)
        now = bool(retrying(lambda: api.model_info(repo, revision="main"), f"model_info {repo}", reporter).private)
        how = "the account's default" if private is None else "--private" if private else "--public"
        reporter.log(f"created {repo}: {'private' if now else 'public'} ({how})")
        return now
    if private is True and not state.private:
        if not make_private:
            raise UsageError(
                f"{repo} exists and is public; --private does not change an existing repository, and nothing was uploaded",
                "pass --make-private to switch it to private before uploading, or push to a new repository",
            )
        retrying(lambda: api.update_repo_settings(repo, private=True), f"make {repo} private", reporter)
        reporter.log(f"{repo} is private now (--make-private)")
        return True
    if private is False and state.private:
        raise UsageError(
            f"{repo} exists and is private; --public does not change an existing repository, and nothing was uploaded",
            "change its visibility in the repository's settings on the Hub if you mean to publish it",
        )
    return bool(state.private)


@dataclass
class Plan:
    """Everything a push sends, prepared and checked before the first request."""

    result: Pushed
    upload: Path  # the checkpoint file to upload (a copy with public metadata, or the original)
    config: bytes
    card_for: Callable[[str | None], object]  # commit -> ModelCard with its usage pinned there
    pin: Callable[[str], Entry]  # commit -> the manifest entry
    zoo: Manifest | None
    endpoint: str
    make_private: bool
    create_pr: bool
    overwrite_card: bool
    cache: Path  # a scratch Hugging Face cache for the remote README.md

    @property
    def digest_note(self) -> str:
        """The upload's short sha256, as the commit messages carry it."""
        return f"(sha256 {self.result.sha256[:12]})"


def push(
    ckpt_path: str | Path,
    repo: str,
    *,
    endpoint: str | None = None,
    manifest: str | Path | None = None,
    zoo_entry: str | None = None,
    private: bool | None = None,
    make_private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    overwrite_card: bool = False,
    dry_run: bool = False,
    license: str | None = None,
    recipe: list[str] | None = None,
    reporter: Reporter | None = None,
) -> Pushed:
    """Upload a checkpoint and its config.json, then its model card; optionally pin it in a manifest."""
    from ..checkpoint import load_checkpoint, sha256_file, with_metadata

    reporter = reporter or Reporter()
    _check_names(repo, zoo_entry, revision, private, make_private, create_pr)
    ckpt_path = Path(ckpt_path)
    load_checkpoint(ckpt_path)  # header, names, shapes and finite weights, before anything is sent (or copied)
    with tempfile.TemporaryDirectory(prefix="advcl-push-") as tmp:
        # one snapshot of the bytes: what is hashed, described and uploaded, even if the file is replaced meanwhile
        snapshot = Path(shutil.copyfile(ckpt_path, Path(tmp) / "snapshot.safetensors"))
        meta = load_checkpoint(snapshot).meta
        public, changed = public_metadata(meta)

        zoo, existing = _open_zoo(manifest, zoo_entry)
        license = check_license(license or (existing.license if existing and existing.license else "mit"))
        recipe = _card_recipe(list(recipe or (existing.recipe if existing else [])))
        base_model = hub_model_of(meta.parent, [SHIPPED, manifest_path(manifest)])

        upload = with_metadata(snapshot, Path(tmp) / DEFAULT_FILENAME, public) if changed else snapshot
        digest = sha256_file(upload)

        def pin(commit: str) -> Entry:
            return entry_for_push(existing, name=zoo_entry, manifest=zoo.path, repo=repo, revision=commit, filename=DEFAULT_FILENAME,
                                  sha256=digest, meta=public, license=license, recipe=recipe)

        def card_for(commit: str | None):
            return build_card(public, repo=repo, sha256=digest, filename=DEFAULT_FILENAME, license=license, recipe=recipe,
                              zoo_name=zoo_entry, revision=commit, base_model=base_model)

        if zoo is not None:  # the entry and the manifest must be right before the commit, not after
            zoo.entries[zoo_entry] = pin(PLACEHOLDER_REVISION)
            render_manifest(zoo)
        draft = card_for(None)
        validate_card_data(draft.data.to_dict(), repo)
        card = sealed(draft)
        config = (json.dumps(public.model_dump(mode="json"), indent=2) + "\n").encode()
        files = _planned_files(ckpt_path, upload, bool(changed), config, card)
        result = Pushed(repo=repo, sha256=digest, files=files, card=card, dry_run=dry_run, revision=revision or "main",
                        private=True if make_private else private, public_fields=changed, zoo_entry=zoo_entry,
                        manifest=zoo.path if zoo else None)
        if changed:
            reporter.log(
                f"{', '.join(changed)} named local paths, the user or this machine: the upload's metadata gives only base names "
                f"(or nothing) there, so its sha256 is {digest[:12]}... ({ckpt_path} is unchanged)"
            )
        if dry_run:
            return result
        if offline():
            raise DownloadError("push needs the network, but HF_HUB_OFFLINE=1 is set", "unset HF_HUB_OFFLINE")
        send(Plan(result, upload, config, card_for, pin, zoo, endpoint_of(endpoint), make_private, create_pr,
                  overwrite_card, Path(tmp) / "hub"), reporter)
    return result


def _open_zoo(manifest: str | Path | None, zoo_entry: str | None) -> tuple[Manifest | None, Entry | None]:
    """The writable manifest that will pin the push (a new one if the file does not exist yet) and
    its entry of that name so far; (None, None) without ``zoo_entry``."""
    if zoo_entry is None:
        return None, None
    man_path = writable_manifest(manifest)
    zoo = load_manifest(man_path) if man_path.exists() else Manifest(man_path, {})
    return zoo, zoo.entries.get(zoo_entry)


def _planned_files(ckpt_path: Path, upload: Path, public_copy: bool, config: bytes, card: str) -> list[dict]:
    """The files a push sends, their sizes and where each comes from (a dry run's report)."""
    return [
        {"path": DEFAULT_FILENAME, "size": upload.stat().st_size, "source": str(ckpt_path) + (" (public metadata)" if public_copy else "")},
        {"path": CONFIG, "size": len(config), "source": "checkpoint metadata"},
        {"path": README, "size": len(card.encode()), "source": "model card (second commit, pinned to the first)"},
    ]


def check_on_hub(repo: str, commit: str, sha256: str, endpoint: str, reporter: Reporter) -> None:
    """The Hub's LFS oid of the uploaded checkpoint at ``commit`` must be ``sha256`` (what was
    hashed): else no manifest entry or card pins a file the Hub does not hold."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo, DEFAULT_FILENAME, revision=commit, endpoint=endpoint)
    try:
        held = retrying(lambda: get_hf_file_metadata(url).etag, f"check of {DEFAULT_FILENAME} in {repo}@{commit[:12]}", reporter)
    except AdvclError:
        raise
    except Exception as e:
        raise hub_error(e, endpoint, repo, commit, DEFAULT_FILENAME) from None
    if held != sha256:
        raise DownloadError(f"{repo}@{commit[:12]} holds {DEFAULT_FILENAME} with sha256 {str(held)[:12]}..., not the "
                            f"{sha256[:12]}... that was uploaded; no manifest entry or model card pins it",
                            "push again (the checkpoint may have changed during the upload)")


def send(plan: Plan, reporter: Reporter) -> None:
    """Steps 1-4 of the module docstring; fills in ``plan.result``."""
    from huggingface_hub import HfApi

    result = plan.result
    api = HfApi(endpoint=plan.endpoint, library_name="advcl", library_version=__version__)
    state, info = commit_files(api, plan, reporter)
    repo, branch, commit = result.repo, result.revision, info.oid
    if commit == state.head:  # the files were already there: keep pinning the commit that brought them
        commit = pinned_commit(state.card or "", repo) or commit
        reporter.log(f"{DEFAULT_FILENAME} and {CONFIG} are unchanged in {repo}@{branch} (first pushed as {commit})")
    else:
        reporter.log(f"pushed {DEFAULT_FILENAME} and {CONFIG} to {repo}@{commit}" + (f" as {info.pr_url}" if getattr(info, "pr_url", None) else ""))
    result.commit, result.url, result.pr_url = commit, info.commit_url, getattr(info, "pr_url", None)
    check_on_hub(repo, commit, result.sha256, plan.endpoint, reporter)  # before anything pins it
    if plan.zoo is not None:
        plan.zoo.entries[result.zoo_entry] = result.entry = plan.pin(commit)
        write_manifest(plan.zoo)
        reporter.log(f"manifest {plan.zoo.path}: entry '{result.zoo_entry}' now pins {repo}@{commit}")
    push_card(api, plan, state, info, commit, reporter)


def commit_files(api, plan: Plan, reporter: Reporter):
    """Steps 1-2: the repository's state, its visibility and branch settled, then one commit of
    the checkpoint and config.json; (the remote state before it, the commit's info)."""
    from huggingface_hub import CommitOperationAdd

    result, ep = plan.result, plan.endpoint
    repo, branch = result.repo, result.revision
    try:
        state = remote_state(api, repo, branch, ep, plan.cache, reporter)
        if plan.create_pr and state.exists and not state.branch_exists:
            raise UsageError(f"branch {branch} does not exist in {repo}; a pull request needs one to merge into")
        result.private = settle_visibility(api, repo, state, result.private, plan.make_private, reporter)
        if branch != "main" and not state.branch_exists:
            retrying(lambda: api.create_branch(repo, branch=branch, exist_ok=True), f"create_branch {repo}@{branch}", reporter)
            reporter.log(f"created branch {branch} in {repo} from main")
        files = [
            CommitOperationAdd(path_in_repo=DEFAULT_FILENAME, path_or_fileobj=str(plan.upload)),
            CommitOperationAdd(path_in_repo=CONFIG, path_or_fileobj=plan.config),
        ]
        info = retrying(lambda: api.create_commit(repo, operations=files, revision=branch, create_pr=plan.create_pr,
                                                  commit_message=f"advcl push: weights and config.json {plan.digest_note}"),
                        f"commit to {repo}@{branch}", reporter)
    except AdvclError:
        raise
    except Exception as e:  # map every client failure to one line
        raise hub_error(e, ep, repo, branch) from None
    return state, info


def push_card(api, plan: Plan, state, info, commit: str, reporter: Reporter) -> None:
    """Step 4: the model card, its usage pinned to ``commit``, committed unless the Hub's card is
    someone else's (kept without --overwrite-card) or already this one."""
    from huggingface_hub import CommitOperationAdd

    result, ep = plan.result, plan.endpoint
    repo, branch = result.repo, result.revision
    result.card = card = sealed(plan.card_for(commit))
    if state.card is not None and not plan.overwrite_card and not written_by_advcl(state.card):
        result.card_action = "kept"
        reporter.log(f"kept the {README} on the Hub (edited there, or not written by advcl); --overwrite-card replaces it")
        return
    if state.card == card:
        result.card_action = "unchanged"
        return
    # into the new pull request; if the files were unchanged there is none, and the card opens one
    target = getattr(info, "pr_revision", None) or branch
    new_pr = plan.create_pr and target == branch
    op = CommitOperationAdd(path_in_repo=README, path_or_fileobj=card.encode())
    try:
        done = retrying(lambda: api.create_commit(repo, operations=[op], revision=target, create_pr=new_pr,
                                                  parent_commit=None if new_pr else info.oid,
                                                  commit_message=f"advcl push: model card for {commit[:12]} {plan.digest_note}"),
                        f"commit of the model card to {repo}@{target}", reporter)
    except Exception as e:
        why = hub_error(e, ep, repo, target)
        raise DownloadError(
            f"pushed the files as {repo}@{commit}{' and updated the manifest' if plan.zoo else ''}, but the model card failed: {why.message}",
            "push again: the files are unchanged, so only the card is committed",
        ) from None
    result.card_commit = done.oid
    result.pr_url = result.pr_url or getattr(done, "pr_url", None)
    reporter.log(f"model card: {repo}@{done.oid}, its usage pinned to {commit[:12]}")
