"""The node label that says pykata is installed (RuntimeClass `pykata` schedules onto it), set and removed
through the Kubernetes API with the installer pod's service account (the `kubernetes` client library).

Outside a pod (no KUBERNETES_SERVICE_HOST) there is no API to call: the step is skipped with a message
saying how to label the node by hand.
"""

from __future__ import annotations

import os
from typing import Any

from pykata.errors import PykataError

LABEL = "katacontainers.io/pykata-runtime"
REQUEST_TIMEOUT = 30.0


class LabelError(PykataError):
    """The node could not be labelled; the message names the node, the label and the API's answer."""


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def set_label(node: str | None, present: bool, configuration: Any = None) -> str:
    """Set (`present`) or remove the label on `node`; says what it did.

    `configuration` is a kubernetes.client.Configuration; None: the pod's service account, and a skip
    outside a pod. Raises LabelError."""
    verb = "label" if present else "unlabel"
    if configuration is None and not in_cluster():
        return (f"not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST): node not {verb}ed; do it with "
                f"`kubectl label node NODE {LABEL}" + ("=true`" if present else "-`"))
    if not node:
        raise LabelError(f"cannot {verb} the node: no node name (--node-name, or NODE_NAME from the downward API)")
    # Lazy: the client library is large and only the installer pod needs it.
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if configuration is None:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException as e:
            raise LabelError(f"cannot {verb} node {node}: no usable service account ({e})") from None
    body = {"metadata": {"labels": {LABEL: "true" if present else None}}}
    try:
        with client.ApiClient(configuration) as api:
            client.CoreV1Api(api).patch_node(node, body, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as e:
        detail = _api_message(e.body) or e.reason
        raise LabelError(f"cannot {verb} node {node} ({LABEL}): the API server at {configuration.host} answered "
                         f"{e.status}: {detail}") from None
    except HTTPError as e:
        raise LabelError(f"cannot {verb} node {node} ({LABEL}): no answer from the API server at "
                         f"{configuration.host} ({type(e).__name__})") from None
    return f"node {node}: {LABEL}=true" if present else f"node {node}: {LABEL} removed"


def _api_message(body: Any) -> str | None:
    """The `message` of a Kubernetes Status body, bounded (the answer is not ours to trust in size)."""
    import json

    if not isinstance(body, (str, bytes)) or len(body) > 65536:
        return None
    try:
        status = json.loads(body)
    except ValueError:
        return None
    message = status.get("message") if isinstance(status, dict) else None
    return str(message)[:300] if message else None
