"""`pykata check`: can this host run pykata? Exit 0 when it can (TCG counts, with a warning)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pykata.config import load_config, load_config_file
from pykata.config.load import find_config_path
from pykata.config.schema import Config
from pykata.errors import ConfigError, PykataError

if TYPE_CHECKING:
    from pykata.hypervisor.check import CheckResult

_MARK = {"pass": ("PASS", "green"), "warn": ("WARN", "yellow"), "fail": ("FAIL", "red")}


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Check with this configuration file instead of the default lookup.")
@click.option("--no-cache", is_flag=True, help="Trial-boot under KVM again instead of using the cached verdict.")
def check(as_json: bool, config_path: Path | None, no_cache: bool) -> None:
    """Check that this host can run pykata VMs: CPU, KVM (a real trial boot), QEMU, virtiofsd,
    vsock, tun, the host's cgroups (v2 or v1), the guest kernel and image, containerd."""
    from pykata.hypervisor.check import can_run, run_checks_sync

    def loader() -> Config:
        # a bad file is named in the "config" line (its hint says "the file named above")
        path = config_path.absolute() if config_path else find_config_path()
        try:
            return load_config_file(config_path.absolute()) if config_path else load_config()
        except ConfigError as exc:
            if path is None or str(path) in str(exc):
                raise
            raise PykataError(f"{path}: {exc}") from None

    results = run_checks_sync(loader, use_cache=not no_cache)
    results.append(_inotify(loader))
    ok = can_run(results)
    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [r.to_json() for r in results]}, indent=2))
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            label, color = _MARK[r.status]
            click.echo(f"{click.style(label, fg=color)}  {r.name:<{width}}  {r.detail}")
            if r.hint and r.status != "pass":
                click.echo(f"      {'':<{width}}  fix: {r.hint}")
        warns = sum(r.status == "warn" for r in results)
        if ok:
            click.echo(f"pykata can run on this host ({warns} warning{'s' if warns != 1 else ''}).")
        else:
            click.echo("pykata cannot run on this host: fix the FAIL lines above.")
    raise SystemExit(0 if ok else 1)


def _inotify(loader: Callable[[], Config]) -> CheckResult:
    """pykata's share of the host's inotify instances (resources.watchable): one per pod shim that
    watches configmap/secret volumes; a pod past them polls its volumes each second instead."""
    from pykata.errors import PykataError
    from pykata.hypervisor.check import CheckResult
    from pykata.resources import watchable

    try:
        slots = loader().runtime.runtime_path / "inotify"
    except PykataError:
        slots = Path("/run/pykata/inotify")
    held, limit = watchable.slots_in_use(slots)
    detail = (f"{held} of pykata's {limit} inotify instances in use (1/{watchable.INOTIFY_SHARE} of "
              f"fs.inotify.max_user_instances = {watchable.max_user_instances()}, shared with kubelet and containerd)")
    facts = {"in_use": held, "limit": limit, "slots_dir": str(slots)}
    if held < limit:
        return CheckResult("inotify", "pass", detail, facts=facts)
    return CheckResult("inotify", "warn", detail + ": more pods' configmap/secret volumes are polled each second "
                       "(updates seen up to 1 s later, an lstat of each entry every second)",
                       "raise fs.inotify.max_user_instances, e.g. sysctl -w fs.inotify.max_user_instances=1024",
                       facts=facts)
