"""A busy or flaky Hub is waited for (429 + Retry-After, 5xx, dropped connections); a dead one fails at once."""

import time
from types import SimpleNamespace

import pytest

from advcl_cli.report import RecordingReporter
from advcl_cli.errors import DownloadError
from advcl_cli.zoo import hub as hubmod
from advcl_cli.zoo.hub import fetch, transient
from advcl_cli.zoo.publish import push
from hubserver import Fault, FaultyProxy, dead_endpoint
from hubtools import commits, hub, make_classifier, repo_name, token  # noqa: F401 (fixtures)

pytestmark = pytest.mark.hub


@pytest.fixture
def waits(monkeypatch):
    """The waits advcl asked for, in seconds (and it does wait them)."""
    asked = []

    def sleep(seconds):
        asked.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(hubmod, "_sleep", sleep)
    return asked


def pushed(tmp_path, url, seed=0):
    ckpt = make_classifier(tmp_path / f"clf{seed}.safetensors", seed=seed)
    return ckpt, push(ckpt, repo_name(), endpoint=url)


def warnings_of(reporter):
    return [e[1] for e in reporter.events if e[0] == "warn"]


def test_pull_waits_out_429_with_retry_after_then_succeeds(tmp_path, hub, token, waits):
    url, _ = hub
    ckpt, result = pushed(tmp_path, url)
    busy = Fault("HEAD", r"/resolve/[0-9a-f]{40}/model\.safetensors$", status=429, headers={"Retry-After": "1"}, times=2)
    with FaultyProxy(url, [busy]) as proxy:
        rec = RecordingReporter()
        started = time.monotonic()
        pulled = fetch(f"hf:{result.repo}@{result.commit}", endpoint=proxy.url, reporter=rec)
        took = time.monotonic() - started
    assert pulled.path.read_bytes() == ckpt.read_bytes()
    heads = [outcome for method, path, outcome in proxy.log if method == "HEAD" and path.endswith("/model.safetensors")]
    assert heads[:3] == [429, 429, 200]
    assert waits == [1.0, 1.0] and took >= 2  # the server's Retry-After, not the back-off's own schedule
    assert [w for w in warnings_of(rec) if "HTTP 429, retrying in 1 s" in w] != [] and len([w for w in warnings_of(rec) if "HTTP 429" in w]) == 2


def test_pull_survives_a_5xx_and_a_connection_reset(tmp_path, hub, token, waits):
    url, _ = hub
    ckpt, result = pushed(tmp_path, url)
    faults = [
        Fault("HEAD", r"/resolve/.*/model\.safetensors$", status=503),
        Fault("GET", r"/resolve/.*/model\.safetensors$", reset=True),
    ]
    with FaultyProxy(url, faults) as proxy:
        pulled = fetch(f"hf:{result.repo}@{result.commit}", endpoint=proxy.url)
    assert pulled.path.read_bytes() == ckpt.read_bytes()
    outcomes = [outcome for _, path, outcome in proxy.log if path.endswith("/model.safetensors")]
    assert outcomes[0] == 503 and "reset" in outcomes and outcomes[-1] == 200
    assert waits[:1] == [1.0]  # the back-off's first wait


def test_push_retries_a_5xx_commit_and_a_reset_preupload_and_commits_once(tmp_path, hub, token, waits):
    url, root = hub
    ckpt = make_classifier(tmp_path / "clf.safetensors")
    repo = repo_name()
    faults = [
        Fault("POST", r"/preupload/", reset=True),
        Fault("POST", r"/commit/", status=503, headers={"Retry-After": "1"}),
        Fault("POST", r"/api/repos/create$", status=429, headers={"Retry-After": "1"}),
    ]
    with FaultyProxy(url, faults) as proxy:
        rec = RecordingReporter()
        result = push(ckpt, repo, endpoint=proxy.url, reporter=rec)
    assert [f.times for f in faults] == [0, 0, 0]  # every fault was met
    assert commits(root, repo) == [result.card_commit, result.commit, commits(root, repo)[-1]]  # initial, files, card: once each
    told = warnings_of(rec)  # the reset preupload may be retried inside huggingface_hub (>= 0.2x wraps it in http_backoff)
    assert any("create_repo" in w and "HTTP 429" in w for w in told) and any("commit to" in w and "HTTP 503" in w for w in told)


def test_a_dead_endpoint_fails_at_once_with_the_offline_hint(tmp_path, token, waits, monkeypatch):
    clf = make_classifier(tmp_path / "clf.safetensors")
    rec = RecordingReporter()
    slept = []  # "at once": no wait anywhere, huggingface_hub's own back-off included (not a clock: a slow machine passes)
    monkeypatch.setattr(time, "sleep", slept.append)
    with dead_endpoint() as url:
        with pytest.raises(DownloadError) as e:
            fetch("hf:advcl-test/any", endpoint=url, reporter=rec)
        with pytest.raises(DownloadError) as pushing:
            push(clf, repo_name(), endpoint=url, reporter=rec)
    assert slept == [] and waits == [] and warnings_of(rec) == []
    for err in (e.value, pushing.value):
        assert err.message == f"cannot reach {url}" and "HF_HUB_OFFLINE" in err.hint


class Answered(Exception):
    """An HTTP error as clients raise them: the response rides along."""

    def __init__(self, status, headers=None):
        super().__init__(f"HTTP {status}")
        self.response = SimpleNamespace(status_code=status, headers=headers or {})


def test_what_counts_as_transient_whatever_the_http_client():
    import httpx
    import requests
    import urllib3

    reset = ConnectionResetError(104, "Connection reset by peer")
    assert transient(Answered(429, {"retry-after": "7"})) == ("HTTP 429", 7.0)
    assert transient(Answered(503)) == ("HTTP 503", None) and transient(Answered(404)) is None
    assert transient(Answered(429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == ("HTTP 429", None)
    # requests/urllib3 (huggingface_hub < 1): the cause sits in args and `reason`
    assert transient(requests.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted.", reset))) is not None
    refused = urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    assert transient(requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/", refused))) is None
    # httpx / httpx2 (huggingface_hub >= 1)
    assert transient(httpx.RemoteProtocolError("Server disconnected without sending a response.")) is not None
    assert transient(httpx.ReadTimeout("timed out")) is not None
    assert transient(httpx.ConnectError("[Errno 111] Connection refused")) is None
    assert transient(httpx.ConnectTimeout("timed out")) is None
    try:
        raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.") from Answered(502)
    except RuntimeError as wrapped:  # huggingface_hub wraps LFS upload failures
        assert transient(wrapped) == ("HTTP 502", None)
    assert transient(DownloadError("advcl's own errors are final")) is None


def test_a_retry_after_longer_than_a_minute_is_reported_not_waited(tmp_path, hub, token, waits):
    url, _ = hub
    _, result = pushed(tmp_path, url)
    with FaultyProxy(url, [Fault("HEAD", r"/resolve/", status=429, headers={"Retry-After": "120"}, times=100)]) as proxy:
        with pytest.raises(DownloadError) as e:
            fetch(f"hf:{result.repo}@{result.commit}", endpoint=proxy.url)
    assert waits == [] and "HTTP 429" in e.value.message and "wait 120 s" in e.value.hint
