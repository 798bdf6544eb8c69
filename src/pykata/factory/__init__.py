"""The VM factory (Kata's virtcontainers/factory), above the hypervisor: VM templates (boot a guest
once, save it, clone it) and the choice of how a sandbox's VM starts. It hands the driver a value, a
`RestoreSource`, never a policy.
"""

from pykata.factory.template import (
    Template,
    destroy_templates,
    ensure_template,
    find_template,
    list_templates,
    prune_templates,
    sync_guest_clock,
    templated_config,
)
from pykata.factory.vm import choose_template, start_vm, template_nics

__all__ = [
    "Template",
    "choose_template",
    "destroy_templates",
    "ensure_template",
    "find_template",
    "list_templates",
    "prune_templates",
    "start_vm",
    "sync_guest_clock",
    "template_nics",
    "templated_config",
]
