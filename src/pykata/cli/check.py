"""`pykata check`: can this host run pykata? Exit 0 when it can (TCG counts, with a warning)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pykata.config import load_config, load_config_file
from pykata.config.schema import Config

_MARK = {"pass": ("PASS", "green"), "warn": ("WARN", "yellow"), "fail": ("FAIL", "red")}


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Check with this configuration file instead of the default lookup.")
@click.option("--no-cache", is_flag=True, help="Trial-boot under KVM again instead of using the cached verdict.")
def check(as_json: bool, config_path: Path | None, no_cache: bool) -> None:
    """Check that this host can run pykata VMs: CPU, KVM (a real trial boot), QEMU, virtiofsd,
    vsock, tun, cgroups v2, the guest kernel and image, containerd."""
    from pykata.hypervisor.check import can_run, run_checks_sync

    def loader() -> Config:
        return load_config_file(config_path.absolute()) if config_path else load_config()

    results = run_checks_sync(loader, use_cache=not no_cache)
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
