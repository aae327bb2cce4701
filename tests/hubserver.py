"""A Hugging Face-compatible test server on 127.0.0.1: olah in offline mode plus an upload layer.

olah (PyPI) serves local git repositories read-only with the Hub's download routes. It has no
upload API, so this test-only app adds the routes huggingface_hub calls to create a repo and
commit files (``/api/repos/create``, ``preupload``, ``commit``, ``/api/validate-yaml``); each
commit becomes a real git commit in ``ROOT/mirrors/models/ORG/REPO``. It also answers a
resolve request for an unknown revision or file of a known repository the way the Hub does
(RevisionNotFound / EntryNotFound), where offline olah would say "repository not found".

Run it as a subprocess (olah's logger replaces sys.stdout)::

    python tests/hubserver.py --port 8765 --root /tmp/hub

Tests use ``running_server(root)``. Write routes need an ``Authorization: Bearer`` header, as
on the Hub; nothing checks its value. Test only: loopback, bounded request bodies.
"""


import argparse
import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

MAX_BODY = 64 << 20
BRANCH = "main"
GITATTRIBUTES = "# advcl test server: every file is a regular git blob (no LFS)\n"
_git_lock = threading.Lock()


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "advcl-test",
        "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "advcl-test",
        "GIT_COMMITTER_EMAIL": "test@localhost",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    return subprocess.run(["git", "-C", str(repo), *args], env=env, capture_output=True, text=True, check=check)


def _error(status: int, code: str | None, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    extra = {"x-error-message": message, **(headers or {})}
    if code:
        extra["x-error-code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=extra)


def build_app(root: Path, port: int):
    """olah's app wrapped in the upload layer."""
    import yaml
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from olah.configs import OlahConfig
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
    base = f"http://127.0.0.1:{port}"

    def repo_dir(org: str, name: str) -> Path:
        return mirrors / "models" / org / name

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization", "").startswith("Bearer ")

    app = FastAPI()

    @app.middleware("http")
    async def hub_errors(request: Request, call_next):
        """Unknown revision / file of a known repo on a resolve route: the Hub's error codes."""
        parts = request.url.path.strip("/").split("/")
        if request.method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            org, name, rev, path = parts[0], parts[1], parts[3], "/".join(parts[4:])
            repo = repo_dir(org, name)
            if repo.is_dir():
                found = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
                if found.returncode != 0:
                    return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                sha = found.stdout.strip()
                if _git(repo, "cat-file", "-e", f"{sha}:{path}", check=False).returncode != 0:
                    return _error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"", {"x-repo-commit": sha})
        return await call_next(request)

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
            return _error(401, None, "Invalid credentials in Authorization header")
        body = await request.json()
        org, name = body.get("organization"), body.get("name")
        if body.get("type") not in (None, "model") or not org or not name:
            return _error(400, None, "this test server hosts model repos named ORG/NAME")
        repo = repo_dir(org, name)
        url = f"{base}/{org}/{name}"
        with _git_lock:
            if repo.exists():
                return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
            repo.mkdir(parents=True)
            _git(repo, "init", "-q", "-b", BRANCH)
            (repo / ".gitattributes").write_text(GITATTRIBUTES)
            _git(repo, "add", "-A")
            _git(repo, "commit", "-q", "-m", "initial commit")
        return {"url": url, "name": f"{org}/{name}", "id": f"{org}/{name}"}

    @app.post("/api/models/{org}/{name}/preupload/{rev}")
    async def preupload(org: str, name: str, rev: str, request: Request):
        if not repo_dir(org, name).is_dir():
            return _error(404, "RepoNotFound", "Repository not found")
        files = (await request.json()).get("files", [])
        return {
            "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files],
        }

    @app.post("/api/models/{org}/{name}/commit/{rev}")
    async def commit(org: str, name: str, rev: str, request: Request):
        if not authorized(request):
            return _error(401, None, "Invalid credentials in Authorization header")
        repo = repo_dir(org, name)
        if not repo.is_dir():
            return _error(404, "RepoNotFound", "Repository not found")
        if rev != BRANCH:
            return _error(400, None, f"this test server commits to '{BRANCH}' only")
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            return _error(413, None, "request too large for the test server")
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, None, "request too large for the test server")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        with _git_lock:
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    continue
                target = (repo / value["path"]).resolve()
                if repo.resolve() not in target.parents:
                    return _error(400, None, f"bad path {value['path']}")
                if key == "file":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    target.unlink(missing_ok=True)
                else:
                    return _error(400, None, f"unsupported commit operation '{key}' (uploads are regular here)")
            message = header.get("summary") or "commit"
            if header.get("description"):
                message += "\n\n" + header["description"]
            _git(repo, "add", "-A")
            _git(repo, "commit", "-q", "--allow-empty", "-m", message)
            sha = _git(repo, "rev-parse", "HEAD").stdout.strip()
        return {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{base}/{org}/{name}/commit/{sha}",
            "commitMessage": message,
            "hookOutput": "",
            "pullRequestUrl": None,
        }

    app.mount("/", olah_app)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(root: Path, timeout: float = 60.0):
    """Start the server as a subprocess on a free port; yield its URL; stop it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--port", str(port), "--root", str(root)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"hub test server exited: {(root / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("hub test server did not start in time")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    import uvicorn

    app = build_app(args.root.resolve(), args.port)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
