"""`pykata factory`: make, inspect and remove the VM template (like `kata-runtime factory`)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import click

from pykata.errors import PykataError


def _config() -> Any:
    from pykata.config.load import load_config

    try:
        return load_config()
    except PykataError as exc:
        raise click.ClickException(str(exc)) from None


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except PykataError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def factory() -> None:
    """VM templates: start sandbox VMs from a saved, booted guest ([factory] in the configuration)."""


_UNUSED_FOR = click.option(
    "--unused-for", type=click.FloatRange(min=0), default=3600.0, show_default=True, metavar="SECONDS",
    help="Remove the other templates that no running VM uses and no VM was started from for this long.")


@factory.command()
@click.option("--force", is_flag=True, help="Remake the template even if a current one exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the template as JSON.")
@_UNUSED_FOR
def init(force: bool, as_json: bool, unused_for: float) -> None:
    """Make the templates for the current configuration (without a NIC, with a NIC on a tap, with a NIC
    on QEMU's user network for the SDK's egress sandboxes; boots a VM for each that does not exist yet),
    and remove other templates left unused (--unused-for)."""
    from pykata.factory import ensure_template, prune_unused_templates

    config = _config()
    started = time.monotonic()

    def progress(message: str) -> None:
        click.echo(f"[pykata factory {time.monotonic() - started:5.1f}s] {message}", err=True)

    # one for VMs without a network (pykata run, ctr run), one for pods with a CNI interface
    # (force removes every template, the second one included, so only the first call forces)
    made = [_run(ensure_template(config, nics=nics, progress=progress, force=force and not nics))
            for nics in (0, 1)]
    # the SDK's network="egress" sandboxes (a tap template's NIC cannot be restored onto user networking)
    made.append(_run(ensure_template(config, nics=1, user_net=True, progress=progress)))
    removed = prune_unused_templates(config, unused_for, keep={t.key for t in made})
    if removed:
        progress(f"removed {len(removed)} unused template(s): {', '.join(removed)}")
    if as_json:
        click.echo(json.dumps([t.to_json() for t in made], indent=1))
    else:
        for t in made:
            user = " on user networking" if t.inputs.get("nic_backend") in ("user", "stream") else ""
            click.echo(f"template {t.key} at {t.dir} ({t.inputs.get('nics', 0)} NICs{user})")
    if not config.factory.enable_template:
        click.echo("note: factory.enable_template is false, so sandboxes do not use it yet", err=True)


@factory.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(as_json: bool) -> None:
    """Show whether templating is on and which templates exist: those the current configuration starts
    VMs from are marked `*`, those a running VM uses `in use` (`pykata factory prune` removes the rest)."""
    from pykata.factory import configured_template_keys, find_template, list_templates, templates_in_use
    from pykata.factory.template import template_root

    config = _config()
    current, problem = None, None
    configured: set[str] = set()
    try:
        current = _run(find_template(config))
        configured = _run(configured_template_keys(config))
    except click.ClickException as exc:
        problem = exc.message
    templates = list_templates(config)
    in_use = templates_in_use(template_root(config))
    if as_json:
        click.echo(json.dumps({
            "enable_template": config.factory.enable_template, "template_path": config.factory.template_path,
            "current": current.key if current else None, "configured": sorted(configured), "problem": problem,
            "templates": [{**t.to_json(), "configured": t.key in configured, "in_use": t.dir.name in in_use}
                          for t in templates]}, indent=1))
        return
    click.echo(f"enable_template: {str(config.factory.enable_template).lower()}")
    click.echo(f"template_path:   {config.factory.template_path}")
    if problem:
        click.echo(f"current:         unknown ({problem})")
    else:
        click.echo(f"current:         {current.key if current else 'not made (pykata factory init)'}")
    for t in templates:
        info = t.to_json()
        mark = "*" if t.key in configured else " "
        click.echo(f"{mark} {t.key}  {info['memory_mib']} MiB x {info['vcpus']} vCPU, {info['nics']} NICs, "
                   f"{info['memory_on_disk_bytes'] / 2**20:.0f} MiB of RAM saved, state "
                   f"{info['state_bytes'] / 1024:.0f} KiB, made in {t.build_seconds:.1f}s, "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t.created_at))}"
                   + (", in use" if t.dir.name in in_use else ""))


@factory.command()
@click.argument("keys", nargs=-1, metavar="[KEY]...")
@click.option("--all", "all_", is_flag=True, help="Remove every template.")
@click.option("--stale", is_flag=True, help="Only the templates whose guest assets changed, and the other templates "
              "(never the current configuration's) that no running VM uses and no VM was started from for "
              "--unused-for seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the removed templates as JSON.")
@_UNUSED_FOR
def destroy(keys: tuple[str, ...], all_: bool, stale: bool, as_json: bool, unused_for: float) -> None:
    """Remove the templates KEY... (as `pykata factory status` lists them), every one with --all, or the
    old ones with --stale (never those the current configuration starts VMs from: `pykata factory
    prune` removes every other, whatever its age). Running VMs started from one are not affected."""
    from pykata.factory import configured_template_keys, destroy_templates, prune_unused_templates

    # no target removes nothing: a bare `destroy` (or `destroy --json`) once removed every template
    if (bool(keys) + all_ + stale) != 1:
        raise click.UsageError("name what to remove: KEY... (pykata factory status lists them), --all or --stale "
                               "(one of them)")
    config = _config()
    if stale:
        # the configuration's own templates are current, however long no VM started from them: what
        # init would make again at once (it keeps them too)
        removed = prune_unused_templates(config, unused_for, keep=_run(configured_template_keys(config)))
    else:
        removed = _run(destroy_templates(config, None if all_ else keys))
    if as_json:
        click.echo(json.dumps({"removed": removed}))
    else:
        click.echo(f"removed {len(removed)} template(s)" + (f": {', '.join(removed)}" if removed else ""))


@factory.command()
@click.option("--config", "configs", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              metavar="PATH", help="Keep this configuration file's templates too (a runtime class with a "
              "configuration of its own); repeatable.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print the removed and kept templates as JSON.")
def prune(configs: tuple[Path, ...], dry_run: bool, as_json: bool) -> None:
    """Remove every template that neither the current configuration nor a --config file starts VMs from
    (an older guest image's, another VM size's), however recently used; never one a running VM or a
    waiting pool VM uses. `pykata factory status` marks which are whose."""
    from pykata.config.load import load_config_file
    from pykata.factory import configured_template_keys, list_templates, prune_other_templates

    config = _config()
    keep = set(_run(configured_template_keys(config)))
    for path in configs:
        try:
            other = load_config_file(path.absolute(), field="--config")
        except PykataError as exc:
            raise click.ClickException(str(exc)) from None
        if Path(other.factory.template_path) != Path(config.factory.template_path):
            raise click.UsageError(f"--config {path}: its factory.template_path {other.factory.template_path} "
                                   f"is not this configuration's ({config.factory.template_path})")
        keep |= _run(configured_template_keys(other))
    before = {t.dir.name for t in list_templates(config)}
    removed = prune_other_templates(config, keep, dry_run=dry_run)
    kept = sorted(before - set(removed))
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": removed, "kept": kept}))
        return
    verb = "would remove" if dry_run else "removed"
    for name in removed:
        click.echo(f"{verb} template {name}")
    click.echo(f"{verb} {len(removed)} template(s), kept {len(kept)}" + (f": {', '.join(kept)}" if kept else ""))


@factory.group()
def pool() -> None:
    """The warm pool: VMs restored ahead of time for the next pods (factory.pool_size)."""


CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"  # containerd's default


@pool.command()
@click.option("--wait", "wait_s", type=float, default=0.0, help="Seconds to wait until the pool is full.")
@click.option("--address", default=CONTAINERD_ADDRESS, show_default=True, metavar="SOCKET",
              help="containerd's socket: its shims' fork server (runtime.shim_fork_server), if one runs, "
              "forks the waiting shims, as a pod's refill does. \"\": fresh processes.")
def fill(wait_s: float, address: str) -> None:
    """Start waiting VMs until the pool holds factory.pool_size of them."""
    from pykata.factory import pool as warm
    from pykata.shim.forkclient import pool_fork

    config = _config()
    if config.factory.pool_size <= 0:
        raise click.ClickException("factory.pool_size is 0: the warm pool is off")
    forked: list[int] = []
    fork = None
    if address and config.runtime.shim_fork_server:
        # Only a server that runs already, launched by a pod's shim where containerd runs it: one
        # launched from here would live in this command's session and cgroup, and fork pods' shims too.
        by_server = pool_fork(config.runtime.runtime_dir, address, launch=False)

        def fork(entry_id: str) -> int | None:
            pid = by_server(entry_id)
            if pid is not None:
                forked.append(pid)
            return pid

    started = warm.fill(config, warm.entry_argv(), fork=fork)
    deadline = time.monotonic() + wait_s
    ready = 0
    while True:
        ready = sum(1 for e in warm.list_entries(config) if e.alive and e.ready)
        if ready >= config.factory.pool_size or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    how = ""
    if started and forked:
        fresh = started - len(forked)
        how = f" ({len(forked)} forked by the shims' fork server of {address}" + (f", {fresh} fresh)" if fresh else ")")
    elif started:
        why = ("runtime.shim_fork_server is off" if not config.runtime.shim_fork_server else
               "no --address" if not address else f"no shims' fork server runs for containerd at {address}")
        how = f" (fresh processes: {why})"
    click.echo(f"started {started}{how}; {ready} of {config.factory.pool_size} ready")


@pool.command(name="status")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def pool_status(as_json: bool) -> None:
    """The waiting VMs: id, pid, ready or starting."""
    from pykata.factory import pool as warm

    config = _config()
    rows = [{"id": e.id, "pid": e.pid, "ready": e.ready, "alive": e.alive,
             "age_s": round(time.time() - e.created_at, 1)} for e in warm.list_entries(config)]
    if as_json:
        click.echo(json.dumps({"pool_size": config.factory.pool_size, "entries": rows}))
        return
    click.echo(f"pool_size: {config.factory.pool_size}")
    for r in rows:
        click.echo(f"{r['id']}  pid {r['pid']}  {'ready' if r['ready'] else 'starting'}"
                   f"{'' if r['alive'] else ' (dead)'}  {r['age_s']}s")


@pool.command(name="destroy")
def destroy_pool() -> None:
    """End every waiting VM (VMs already handed to pods are not affected)."""
    from pykata.factory import pool as warm

    click.echo(f"ended {len(warm.destroy(_config()))} waiting VM(s)")
