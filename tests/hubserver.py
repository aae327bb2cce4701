"""A Hugging Face-compatible test server on 127.0.0.1: olah in offline mode plus an upload layer.

olah (PyPI) serves local git repositories read-only with the Hub's download routes. It has no
upload API, so this test-only app adds what huggingface_hub calls to publish, the way the Hub
answers it:

- ``/api/repos/create`` (visibility: ``private``/``visibility`` in the request, else the
  organisation's default: the orgs in ``--private-orgs`` default to private), ``PUT .../settings``
  (change visibility), ``POST .../branch/NAME``, ``/api/validate-yaml``;
- ``preupload``: "lfs" for paths the repo's ``.gitattributes`` sends to LFS (``*.safetensors``
  ...) and for files over 10 MB, else "regular", with the remote ``oid`` of a file that exists so
  the client skips unchanged files, as on the Hub;
- the Git LFS batch API (``/ORG/NAME.git/info/lfs/objects/batch``, "basic" transfer only) and
  its upload (PUT) and verify routes. Objects are checked against their sha256 and stored where
  git-lfs keeps them (``.git/lfs/objects/aa/bb/OID``); a commit's ``lfsFile`` becomes a git LFS
  pointer, which olah serves with the object's bytes and its sha256 as the etag. A "regular"
  file that should have been LFS is refused, as the Hub refuses it. No xet: huggingface_hub >= 1
  uploads through xet whenever ``hf_xet`` is installed, so tests set ``HF_HUB_DISABLE_XET=1``
  (older clients use xet only when the server offers it, and this one never does);
- ``commit`` to any branch, ``refs/pr/N`` or a new pull request (``create_pr=1``), each a real
  git commit built with git plumbing in ``ROOT/mirrors/models/ORG/NAME``;
- ``/api/models/ORG/NAME[/revision/REV]`` (olah's repo info plus the real ``private`` flag).

Private repositories answer 401 RepoNotFound without an ``Authorization`` header. Unknown
revisions or files of a known repository get the Hub's RevisionNotFound / EntryNotFound codes,
where offline olah would say "repository not found". Every request is appended to
``ROOT/requests.log`` ("METHOD PATH STATUS"), so tests can see what a client sent.

Run it as a subprocess (olah's logger replaces sys.stdout)::

    python tests/hubserver.py --port 8765 --root /tmp/hub [--private-orgs lab1,lab2]

Tests use ``running_server(root)``, and ``FaultyProxy`` (in-process, stdlib) in front of it to
answer chosen requests with 429/5xx or a connection reset. Write routes need an
``Authorization: Bearer`` header, as on the Hub; nothing checks its value. Test only: loopback,
bounded request bodies.
"""


import argparse
import base64
import contextlib
import fnmatch
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from waiting import HANG_S

MAX_BODY = 64 << 20  # a commit request (regular files are inlined in base64)
MAX_LFS_OBJECT = 512 << 20
LFS_THRESHOLD = 10 << 20  # the Hub sends files over 10 MB to LFS whatever .gitattributes says
BRANCH = "main"
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.ckpt", "*.h5", "*.npy", "*.npz", "*.onnx", "*.pt", "*.pth", "*.safetensors", "*.tar.*", "*.zip")
)
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
LFS_POINTER_RE = re.compile(r"^version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n$")
_git_lock = threading.Lock()


def _git(repo: Path, *args: str, check: bool = True, input: bytes | None = None, index: Path | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "advcl-test",
        "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "advcl-test",
        "GIT_COMMITTER_EMAIL": "test@localhost",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    if index is not None:
        env["GIT_INDEX_FILE"] = str(index)
    res = subprocess.run(["git", "-C", str(repo), *args], env=env, capture_output=True, input=input, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {res.stderr.decode(errors='replace').strip()}")
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace"))


def _rev(repo: Path, rev: str) -> str | None:
    found = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    return found.stdout.strip() if found.returncode == 0 else None


def _ref(rev: str) -> str:
    """The full ref a commit to ``rev`` moves: refs/pr/N as is, anything else a branch."""
    return rev if rev.startswith("refs/") else f"refs/heads/{rev}"


def _blob(repo: Path, commit: str, path: str) -> bytes | None:
    res = subprocess.run(["git", "-C", str(repo), "cat-file", "blob", f"{commit}:{path}"], capture_output=True, check=False)
    return res.stdout if res.returncode == 0 else None


def _error(status: int, code: str | None, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    extra = {"x-error-message": message, **(headers or {})}
    if code:
        extra["x-error-code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=extra)


def lfs_object_path(repo: Path, oid: str) -> Path:
    """Where git-lfs (and olah's mirror reader) keeps an object."""
    return repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def build_app(root: Path, port: int, private_orgs: frozenset[str] = frozenset()):
    """olah's app wrapped in the upload layer."""
    import yaml
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from olah.configs import OlahConfig
    from olah.mirror.repos import LocalMirrorRepo
    from olah.server import AppSettings
    from olah.server import app as olah_app

    mirrors = root / "mirrors"
    (mirrors / "models").mkdir(parents=True, exist_ok=True)
    config_path = root / "olah.toml"
    config_path.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{root / "cache"}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        'hf-scheme = "http"\nhf-netloc = "127.0.0.1:9"\nhf-lfs-netloc = "127.0.0.1:9"\n'
        "[accessibility]\noffline = true\n"
    )
    olah_app.state.app_settings = AppSettings(config=OlahConfig(str(config_path)))
    olah_app.state.logger = logging.getLogger("olah")
    request_log = root / "requests.log"
    log_lock = threading.Lock()

    def repo_dir(org: str, name: str) -> Path:
        return mirrors / "models" / org / name

    def settings_file(repo: Path) -> Path:
        return repo / ".git" / "advcl-test-settings.json"

    def is_private(repo: Path) -> bool:
        return bool(json.loads(settings_file(repo).read_text()).get("private")) if settings_file(repo).exists() else False

    def set_private(repo: Path, private: bool) -> None:
        settings_file(repo).write_text(json.dumps({"private": private}))

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization", "").startswith("Bearer ")

    def unauthorized():
        return _error(401, None, "Invalid credentials in Authorization header")

    def write_target(org: str, name: str, request: Request):
        """(the repo's folder, None) for an authorised write to an existing repo, else (None, the error)."""
        if not authorized(request):
            return None, unauthorized()
        repo = repo_dir(org, name)
        return (repo, None) if repo.is_dir() else (None, _error(404, "RepoNotFound", "Repository not found"))

    def base_of(request: Request) -> str:
        return str(request.base_url).rstrip("/")  # the address the client used (through a proxy too)

    def lfs_patterns(repo: Path, commit: str) -> list[str]:
        text = (_blob(repo, commit, ".gitattributes") or b"").decode(errors="replace")
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line.split()[1:]]

    def goes_to_lfs(patterns: list[str], path: str, size: int) -> bool:
        name = path.rsplit("/", 1)[-1]
        return size > LFS_THRESHOLD or any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)

    def remote_oid(repo: Path, commit: str, path: str) -> str | None:
        """What the Hub reports for an existing file: the LFS sha256, else the git blob id."""
        data = _blob(repo, commit, path)
        if data is None:
            return None
        pointer = LFS_POINTER_RE.match(data.decode(errors="replace")) if len(data) < 200 else None
        return pointer.group(1) if pointer else _git(repo, "rev-parse", f"{commit}:{path}").stdout.strip()

    def write_commit(repo: Path, ref: str, parent: str | None, files: dict[str, bytes], deleted: list[str], message: str,
                     new_ref: bool = False) -> str:
        """A commit on ``ref`` (at ``parent``, or a ``new_ref``) with ``files`` written and
        ``deleted`` removed, built with git plumbing: no work tree, any ref."""
        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "index"
            if parent:
                _git(repo, "read-tree", parent, index=index)
            for path in deleted:
                listed = _git(repo, "ls-files", "--", path, index=index).stdout.split("\n")
                for name in [n for n in listed if n]:
                    _git(repo, "update-index", "--force-remove", "--", name, index=index)
            for path, data in files.items():
                sha = _git(repo, "hash-object", "-w", "--stdin", input=data).stdout.strip()
                _git(repo, "update-index", "--add", "--cacheinfo", f"100644,{sha},{path}", index=index)
            tree = _git(repo, "write-tree", index=index).stdout.strip()
        commit = _git(repo, "commit-tree", tree, *(["-p", parent] if parent else []), input=message.encode()).stdout.strip()
        _git(repo, "update-ref", ref, commit, "" if new_ref or not parent else parent)
        return commit

    app = FastAPI()

    @app.middleware("http")
    async def hub_rules(request: Request, call_next):
        """Private repos need a token; unknown revision / file of a known repo on a resolve route
        get the Hub's error codes; every request is logged."""
        response = await _hub_rules(request, call_next)
        with log_lock, open(request_log, "a") as f:
            f.write(f"{request.method} {request.url.path} {response.status_code}\n")
        return response

    async def _hub_rules(request: Request, call_next):
        parts = request.url.path.strip("/").split("/")
        org = name = None
        if len(parts) >= 3 and parts[0] == "api" and parts[1] == "models" and len(parts) >= 4:
            org, name = parts[2], parts[3]
        elif len(parts) >= 2 and parts[0] not in ("api", "_lfs"):
            org, name = parts[0], parts[1].removesuffix(".git")
        repo = repo_dir(org, name) if org and name else None
        if repo is not None and repo.is_dir() and is_private(repo) and not authorized(request):
            return _error(401, "RepoNotFound", "Repository not found")
        if request.method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve" and repo is not None and repo.is_dir():
            rev, path = parts[3], "/".join(parts[4:])
            sha = _rev(repo, rev)
            if sha is None:
                return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            blob = _blob(repo, sha, path)
            if blob is None:
                return _error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"", {"x-repo-commit": sha})
            pointer = LFS_POINTER_RE.match(blob.decode(errors="replace")) if len(blob) < 200 else None
            if pointer is not None:  # olah would read the object into memory and stream it in 4 KB chunks
                return lfs_file(repo, sha, pointer.group(1), request.method)
        return await call_next(request)

    def lfs_file(repo: Path, commit: str, oid: str, method: str):
        """An LFS file as the Hub serves it: its sha256 as the etag (X-Linked-Etag too), its size."""
        stored = lfs_object_path(repo, oid)
        size = str(stored.stat().st_size)
        headers = {"etag": f'"{oid}"', "x-linked-etag": f'"{oid}"', "x-linked-size": size, "x-repo-commit": commit}
        if method == "HEAD":
            return Response(headers={**headers, "content-length": size})
        return FileResponse(stored, headers=headers, media_type="application/octet-stream")

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        content = (await request.json()).get("content", "")
        if content.startswith("---"):
            try:
                yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as e:
                return JSONResponse({"errors": [{"message": str(e)}], "warnings": []}, status_code=400)
        return {"errors": [], "warnings": []}

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        if not authorized(request):
            return unauthorized()
        body = await request.json()
        org, name = body.get("organization"), body.get("name")
        if body.get("type") not in (None, "model") or not org or not name:
            return _error(400, None, "this test server hosts model repos named ORG/NAME")
        private = body.get("private")
        if body.get("visibility") is not None:
            private = body["visibility"] == "private"
        repo = repo_dir(org, name)
        url = f"{base_of(request)}/{org}/{name}"
        with _git_lock:
            if repo.exists():
                return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
            repo.mkdir(parents=True)
            _git(repo, "init", "-q", "-b", BRANCH)
            set_private(repo, org in private_orgs if private is None else bool(private))
            write_commit(repo, _ref(BRANCH), None, {".gitattributes": GITATTRIBUTES.encode()}, [], "initial commit", new_ref=True)
        return {"url": url, "name": f"{org}/{name}", "id": f"{org}/{name}"}

    @app.put("/api/models/{org}/{name}/settings")
    async def settings(org: str, name: str, request: Request):
        repo, refused = write_target(org, name, request)
        if refused:
            return refused
        body = await request.json()
        private = body.get("private")
        if body.get("visibility") is not None:
            private = body["visibility"] == "private"
        if private is not None:
            set_private(repo, bool(private))
        return {"private": is_private(repo)}

    def repo_info(org: str, name: str, rev: str, request: Request):
        repo = repo_dir(org, name)
        if not repo.is_dir():
            return _error(401 if not authorized(request) else 404, "RepoNotFound", "Repository not found")
        sha = _rev(repo, rev)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        meta = LocalMirrorRepo(str(repo), "models", org, name).get_meta(sha)
        meta["private"] = is_private(repo)
        return meta

    @app.get("/api/models/{org}/{name}")
    async def model_info(org: str, name: str, request: Request):
        return repo_info(org, name, BRANCH, request)

    @app.get("/api/models/{org}/{name}/revision/{rev:path}")
    async def model_info_at(org: str, name: str, rev: str, request: Request):
        return repo_info(org, name, rev, request)

    @app.post("/api/models/{org}/{name}/branch/{branch:path}")
    async def create_branch(org: str, name: str, branch: str, request: Request):
        repo, refused = write_target(org, name, request)
        if refused:
            return refused
        body = await request.json() if int(request.headers.get("content-length") or 0) else {}
        start = _rev(repo, body.get("startingPoint") or BRANCH)
        if start is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {body.get('startingPoint')}")
        with _git_lock:
            if _rev(repo, f"refs/heads/{branch}") is not None:
                return _error(409, None, f"Reference already exists: refs/heads/{branch}")
            _git(repo, "update-ref", f"refs/heads/{branch}", start)
        return {}

    @app.post("/api/models/{org}/{name}/preupload/{rev:path}")
    async def preupload(org: str, name: str, rev: str, request: Request):
        repo = repo_dir(org, name)
        if not repo.is_dir():
            return _error(404, "RepoNotFound", "Repository not found")
        sha = _rev(repo, rev)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        patterns = lfs_patterns(repo, sha)
        files = (await request.json()).get("files", [])
        return {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if goes_to_lfs(patterns, f["path"], int(f.get("size") or 0)) else "regular",
                    "shouldIgnore": False,
                    "oid": remote_oid(repo, sha, f["path"]),
                }
                for f in files
            ],
        }

    @app.post("/{org}/{repo_git}/info/lfs/objects/batch")
    async def lfs_batch(org: str, repo_git: str, request: Request):
        repo, refused = write_target(org, repo_git.removesuffix(".git"), request)
        if refused or not repo_git.endswith(".git"):
            return refused or _error(404, "RepoNotFound", "Repository not found")
        body = await request.json()
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            return _error(400, None, "this test server takes LFS uploads with the basic transfer only")
        base = f"{base_of(request)}/_lfs/{org}/{repo_git.removesuffix('.git')}"
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", -1))
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not 0 <= size <= MAX_LFS_OBJECT:
                objects.append({"oid": oid, "size": max(size, 0), "error": {"code": 422, "message": "bad oid or size"}})
                continue
            stored = lfs_object_path(repo, oid)
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not (stored.is_file() and stored.stat().st_size == size):  # else already uploaded: no actions
                entry["actions"] = {
                    "upload": {"href": f"{base}/{oid}", "header": {}},
                    "verify": {"href": f"{base}/{oid}/verify", "header": {}},
                }
            objects.append(entry)
        return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, media_type="application/vnd.git-lfs+json")

    @app.put("/_lfs/{org}/{name}/{oid}")
    async def lfs_upload(org: str, name: str, oid: str, request: Request):
        repo = repo_dir(org, name)
        if not repo.is_dir() or not re.fullmatch(r"[0-9a-f]{64}", oid):
            return _error(404, None, "no such upload")
        target = lfs_object_path(repo, oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_LFS_OBJECT:
                        return _error(413, None, "object too large for the test server")
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != oid:
                return _error(400, None, f"uploaded content has sha256 {digest.hexdigest()}, not {oid}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return Response(status_code=200)

    @app.post("/_lfs/{org}/{name}/{oid}/verify")
    async def lfs_verify(org: str, name: str, oid: str, request: Request):
        if not authorized(request):
            return unauthorized()
        body = await request.json()
        stored = lfs_object_path(repo_dir(org, name), oid)
        if body.get("oid") != oid or not stored.is_file() or stored.stat().st_size != body.get("size"):
            return _error(404, None, f"LFS object {oid} was not uploaded")
        return {"oid": oid, "size": body["size"]}

    @app.post("/api/models/{org}/{name}/commit/{rev:path}")
    async def commit(org: str, name: str, rev: str, request: Request):
        repo, refused = write_target(org, name, request)
        if refused:
            return refused
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            return _error(413, None, "request too large for the test server")
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, None, "request too large for the test server")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        message = header.get("summary") or "commit"
        if header.get("description"):
            message += "\n\n" + header["description"]
        with _git_lock:
            parent = _rev(repo, rev)
            if parent is None:
                return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            if header.get("parentCommit") and header["parentCommit"] != parent:
                return _error(412, None, f"A commit has happened since {header['parentCommit']}")
            patterns = lfs_patterns(repo, parent)
            files: dict[str, bytes] = {}
            deleted: list[str] = []
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    continue
                path = str(value.get("path", ""))
                if not path or path.startswith("/") or ".." in path.split("/") or path.startswith(".git/"):
                    return _error(400, None, f"bad path {path}")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    if goes_to_lfs(patterns, path, len(data)):
                        return _error(400, None, f"Your push was rejected because {path} must be stored with Git LFS")
                    files[path] = data
                elif key == "lfsFile":
                    oid, size = str(value.get("oid")), value.get("size")
                    stored = lfs_object_path(repo, oid) if re.fullmatch(r"[0-9a-f]{64}", oid) else None
                    if value.get("algo") != "sha256" or stored is None or not stored.is_file() or stored.stat().st_size != size:
                        return _error(400, None, f"Your push was rejected because an LFS pointer pointed to a file that does not exist ({path})")
                    files[path] = LFS_POINTER.format(oid=oid, size=size).encode()
                elif key == "deletedFile" or key == "deletedFolder":
                    deleted.append(path)
                else:
                    return _error(400, None, f"unsupported commit operation '{key}'")
            pr_url, ref, new_ref = None, _ref(rev), False
            if request.query_params.get("create_pr") in ("1", "true"):
                number = 1 + sum(1 for _ in _git(repo, "for-each-ref", "refs/pr/").stdout.splitlines())
                ref, new_ref = f"refs/pr/{number}", True
                pr_url = f"{base_of(request)}/{org}/{name}/discussions/{number}"
            sha = write_commit(repo, ref, parent, files, deleted, message, new_ref)
        return {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{base_of(request)}/{org}/{name}/commit/{sha}",
            "commitMessage": message,
            "hookOutput": "",
            "pullRequestUrl": pr_url,
        }

    app.mount("/", olah_app)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dead_endpoint():
    """A URL on 127.0.0.1 where nothing answers: its port is bound but not listening, so a
    connection is refused, and held until the block ends, so no other test can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _wait_for_port(port: int, deadline: float, alive=lambda: True) -> None:
    while True:
        if not alive():
            raise RuntimeError("server exited")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start in time")
        time.sleep(0.1)


@contextlib.contextmanager
def running_server(root: Path, timeout: float = HANG_S, private_orgs: tuple[str, ...] = ()):
    """Start the server as a subprocess on a free port; yield its URL; stop it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # the port is free when picked; another test may bind it before the server does
        port = free_port()
        log = open(root / "server.log", "wb")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--port", str(port), "--root", str(root)]
        if private_orgs:
            cmd += ["--private-orgs", ",".join(private_orgs)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
        try:
            _wait_for_port(port, time.monotonic() + timeout, alive=lambda: proc.poll() is None)
            break
        except RuntimeError as e:
            proc.kill()
            proc.wait()
            log.close()
            text = (root / "server.log").read_text()
            if attempt < 2 and "address already in use" in text.lower():
                continue
            raise RuntimeError(f"hub test server: {e}: {text[-2000:]}") from None
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def requests_seen(root: Path) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request the server at ``root`` answered so far."""
    path = Path(root) / "requests.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(m, p, int(s)) for m, p, s in (line.rsplit(" ", 2) for line in lines)]


# --- fault injection -------------------------------------------------------------------------


@dataclass
class Fault:
    """The next ``times`` requests whose method is ``method`` and whose path matches ``path`` (a
    regex) get ``status`` (with ``headers``) or, with ``reset``, a TCP reset instead of an answer."""

    method: str
    path: str
    status: int | None = None
    headers: dict = field(default_factory=dict)
    reset: bool = False
    times: int = 1


class FaultyProxy:
    """A loopback HTTP proxy in front of ``upstream`` that injects ``faults`` and forwards the
    rest; ``log`` lists (method, path, what happened: a status or "reset"). Runs in a thread."""

    def __init__(self, upstream: str, faults: list[Fault]):
        self.upstream = urlsplit(upstream)
        self.faults = faults
        self.log: list[tuple[str, str, int | str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _handle(self):
                body = self._body()
                fault = proxy._take(self.command, urlsplit(self.path).path)
                if fault is not None and fault.reset:
                    proxy._record(self.command, self.path, "reset")
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault is not None:
                    payload = json.dumps({"error": f"injected {fault.status}"}).encode()
                    self.send_response(fault.status)
                    for key, value in {"x-error-message": f"injected {fault.status}", **fault.headers}.items():
                        self.send_header(key, value)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.send_header("connection", "close")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    self.close_connection = True
                    proxy._record(self.command, self.path, fault.status)
                    return
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=HANG_S)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                headers["content-length"] = str(len(body))
                up.request(self.command, self.path, body=body if body or self.command in ("POST", "PUT") else None, headers=headers)
                resp = up.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(key, value)
                length = resp.getheader("content-length") if self.command == "HEAD" else str(len(data))
                if length is not None:
                    self.send_header("content-length", length)
                self.send_header("connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                self.close_connection = True
                up.close()
                proxy._record(self.command, self.path, resp.status)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

            def finish(self):
                with contextlib.suppress(OSError):
                    super().finish()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and re.search(fault.path, path):
                    fault.times -= 1
                    return fault
        return None

    def _record(self, method: str, path: str, outcome) -> None:
        with self._lock:
            self.log.append((method, urlsplit(path).path, outcome))

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--private-orgs", default="", help="organisations whose new repos are private by default")
    args = parser.parse_args()
    import uvicorn

    orgs = frozenset(o for o in args.private_orgs.split(",") if o)
    app = build_app(args.root.resolve(), args.port, orgs)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
