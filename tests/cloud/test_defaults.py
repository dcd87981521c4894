"""Safe defaults: no slash redirects, docs only where asked, /metrics optionally behind the token,
no unauthenticated service off loopback unless the operator says so."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from stablesynth.cloud.exposure import is_loopback, unauthenticated_warning
from stablesynth.cloud.server import CloudModel, create_app

from .conftest import TOKEN

BODY = np.zeros(192, "<f4").tobytes()


def test_a_trailing_slash_is_a_404_without_a_redirect(cloud: CloudModel, live_server: Any) -> None:
    with live_server(create_app({"easyvqa": cloud}, token=TOKEN)) as srv:
        r = httpx.post(srv.url + "/v1/models/easyvqa/adapt/", content=BODY, timeout=5,
                       headers={"Content-Type": "application/octet-stream", "Host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers and r.json()["error"] == "not_found"


def test_docs_off_and_metrics_behind_the_token_when_asked(cloud: CloudModel, live_server: Any) -> None:
    with live_server(create_app({"easyvqa": cloud}, token=TOKEN, docs=False, protect_metrics=True)) as srv:
        codes = [httpx.get(srv.url + p, timeout=5).status_code for p in ("/docs", "/openapi.json", "/redoc")]
        metrics = httpx.get(srv.url + "/metrics", timeout=5)
        authed = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        health = httpx.get(srv.url + "/healthz", timeout=5)
    assert codes == [404, 404, 404]
    assert metrics.status_code == 401 and authed.status_code == 200 and b"stablesynth_requests" in authed.content
    assert health.status_code == 200
    with live_server(create_app({"easyvqa": cloud}, token=TOKEN)) as srv:  # the defaults of an embedded app
        assert httpx.get(srv.url + "/openapi.json", timeout=5).status_code == 200
        assert httpx.get(srv.url + "/metrics", timeout=5).status_code == 200


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                                ("::", False), ("10.0.0.5", False), ("example.com", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_no_token_off_loopback_is_refused_unless_allowed() -> None:
    assert unauthenticated_warning("127.0.0.1", None, False) is None
    assert unauthenticated_warning("0.0.0.0", TOKEN, False) is None
    with pytest.raises(ValueError, match=r"--host 0\.0\.0\.0.*--allow-unauthenticated"):
        unauthenticated_warning("0.0.0.0", None, False)
    warning = unauthenticated_warning("0.0.0.0", None, True)
    assert warning is not None and "without a token" in warning


def test_serve_refuses_a_public_host_without_a_token(tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from stablesynth.cli import main

    monkeypatch.delenv("STABLESYNTH_TOKEN", raising=False)
    assert main(["serve", "--checkpoint", str(tmp_path), "--host", "0.0.0.0", "--port", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--host 0.0.0.0" in err and "--allow-unauthenticated" in err
