"""The VM factory (Kata's virtcontainers/factory), above the hypervisor: VM templates (boot a guest
once, save it, clone it) and the choice of how a sandbox's VM starts. It hands the driver a value, a
`RestoreSource`, never a policy.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pykata.factory.template import (
        Template,
        configured_template_keys,
        destroy_templates,
        ensure_template,
        find_template,
        list_templates,
        prune_other_templates,
        prune_templates,
        prune_unused_templates,
        sync_guest_clock,
        templated_config,
        templates_in_use,
    )
    from pykata.factory.vm import choose_template, start_vm, template_nics

# Loaded on first use (PEP 562): `shim start` reaches pykata.factory.pool without importing the
# driver stack that templates need.
_HOME = {name: "pykata.factory.template" for name in (
    "Template", "configured_template_keys", "destroy_templates", "ensure_template", "find_template",
    "list_templates", "prune_other_templates", "prune_templates", "prune_unused_templates", "sync_guest_clock",
    "templated_config", "templates_in_use")} | {
    name: "pykata.factory.vm" for name in ("choose_template", "start_vm", "template_nics")}


def __getattr__(name: str) -> Any:
    import importlib

    if name not in _HOME:
        raise AttributeError(f"module 'pykata.factory' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


__all__ = [
    "Template",
    "choose_template",
    "configured_template_keys",
    "destroy_templates",
    "ensure_template",
    "find_template",
    "list_templates",
    "prune_other_templates",
    "prune_templates",
    "prune_unused_templates",
    "start_vm",
    "sync_guest_clock",
    "template_nics",
    "templated_config",
    "templates_in_use",
]
