"""The node label through the Kubernetes API (the `kubernetes` client). No cluster runs here, so these
unit tests talk to FakeApiServer, a few lines of http.server that answer PATCH /api/v1/nodes/NAME as
the API server would (or refuse it): a fake, for the request's shape and the error paths only."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from pykata.deploy import labels


class FakeApiServer(ThreadingHTTPServer):
    """A fake Kubernetes API server: records PATCHes; `status` != 200 answers with a Status error."""

    status = 200
    patches: list[tuple[str, str, Any]]


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.patches.append((self.path, self.headers["Content-Type"], body))
        name = self.path.rsplit("/", 1)[-1]
        if self.server.status == 200:
            labels_ = {k: v for k, v in body["metadata"]["labels"].items() if v is not None}
            reply = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels_}}
        else:
            reply = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": self.server.status,
                     "reason": "Forbidden", "message": f'nodes "{name}" is forbidden: User '
                     '"system:serviceaccount:kube-system:pykata-deploy" cannot patch resource "nodes"'}
        data = json.dumps(reply).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[FakeApiServer]:
    server = FakeApiServer(("127.0.0.1", 0), _Handler)
    server.patches = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _configuration(server: FakeApiServer) -> client.Configuration:
    c = client.Configuration()
    c.host = f"http://127.0.0.1:{server.server_address[1]}"
    return c


def test_label_and_unlabel_patch_the_node(fake_api: FakeApiServer) -> None:
    assert labels.set_label("node-1", True, _configuration(fake_api)) == f"node node-1: {labels.LABEL}=true"
    assert labels.set_label("node-1", False, _configuration(fake_api)) == f"node node-1: {labels.LABEL} removed"
    (path1, ctype, body1), (path2, _, body2) = fake_api.patches
    assert path1 == path2 == "/api/v1/nodes/node-1" and "patch" in ctype
    assert body1 == {"metadata": {"labels": {labels.LABEL: "true"}}}
    assert body2 == {"metadata": {"labels": {labels.LABEL: None}}}  # null removes the key


def test_a_refusal_names_node_label_and_the_api_message(fake_api: FakeApiServer) -> None:
    fake_api.status = 403
    with pytest.raises(labels.LabelError) as e:
        labels.set_label("node-1", True, _configuration(fake_api))
    msg = str(e.value)
    assert "node node-1" in msg and labels.LABEL in msg and "403" in msg and "cannot patch resource" in msg


def test_no_api_server_is_a_clear_error(fake_api: FakeApiServer) -> None:
    c = _configuration(fake_api)
    fake_api.shutdown()
    fake_api.server_close()
    c.retries = 0
    with pytest.raises(labels.LabelError, match=r"no answer from the API server at http://127\.0\.0\.1"):
        labels.set_label("node-1", True, c)


def test_outside_a_pod_the_step_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    msg = labels.set_label("node-1", True)
    assert "not running in a Kubernetes pod" in msg and f"kubectl label node NODE {labels.LABEL}=true" in msg


def test_in_a_pod_without_a_service_account_token_the_error_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "1")
    with pytest.raises(labels.LabelError, match="no usable service account"):
        labels.set_label("node-1", True)
    with pytest.raises(labels.LabelError, match="no node name"):
        labels.set_label(None, True)
