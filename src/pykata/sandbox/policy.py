"""The agent policy on the host side: read the configured document (or the pod's, when allowed), check
it with the agent's own parser so a bad one fails the pod before a VM starts, and hand the agent a
canonical JSON text. The agent enforces it (pykata.agent.policy); docs/policy.md has the schema."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from pykata.agent.policy import MAX_POLICY_BYTES, PolicyError, policy_from_mapping
from pykata.config.schema import PykataAgentConfig
from pykata.errors import ConfigError


def load_policy(agent: PykataAgentConfig) -> str | None:
    """The policy document for a sandbox as JSON, or None when none is configured.

    Raises:
        ConfigError: naming `agent.pykata.policy` / `agent.pykata.policy_file` and the bad key.
    """
    if agent.policy:
        return _canonical(agent.policy, "agent.pykata.policy", json_first=agent.policy.lstrip().startswith("{"))
    if not agent.policy_file:
        return None
    path = Path(agent.policy_file)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise ConfigError("agent.pykata.policy_file", f"cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError("agent.pykata.policy_file", f"{path} is not UTF-8 text") from None
    return _canonical(text, f"agent.pykata.policy_file ({path})", json_first=path.suffix == ".json")


def _canonical(text: str, where: str, *, json_first: bool) -> str:
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise ConfigError(where, f"the policy is larger than {MAX_POLICY_BYTES} bytes")
    try:
        data = json.loads(text) if json_first else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(where, f"not valid {'JSON' if json_first else 'TOML'}: {exc}") from None
    try:
        policy_from_mapping(data)
    except PolicyError as exc:
        raise ConfigError(where, str(exc)) from None
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
