"""`pykata env`: the effective configuration (after the lookup) and what it resolves to on this host."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from pykata.config import Config, load_config, load_config_file
from pykata.errors import PykataError


def _resolved(config: Config) -> dict[str, Any]:
    from pykata.hypervisor.qemu.assets import resolve_kernel, resolve_rootfs

    out: dict[str, Any] = {}
    try:
        out["kernel"] = str(resolve_kernel(config))
    except PykataError as exc:
        out["kernel"] = f"(missing: {exc})"
    try:
        initrd, image = resolve_rootfs(config)
        out["initrd"] = str(initrd) if initrd else ""
        out["image"] = str(image) if image else ""
    except PykataError as exc:
        out["initrd"] = f"(missing: {exc})"
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _print_toml(table: dict[str, Any], prefix: str = "") -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if scalars and prefix:
        click.echo(f"[{prefix}]")
    for key, value in scalars.items():
        click.echo(f"{key} = {_toml_value(value)}")
    if scalars:
        click.echo()
    for key, value in table.items():
        if isinstance(value, dict):
            _print_toml(value, f"{prefix}.{key}" if prefix else key)


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Show this configuration file instead of the default lookup.")
def env(as_json: bool, config_path: Path | None) -> None:
    """Show the effective configuration, where it came from and the guest assets it resolves to."""
    try:
        config = load_config_file(config_path.absolute()) if config_path else load_config()
    except PykataError as exc:
        raise click.ClickException(str(exc)) from None
    data = dataclasses.asdict(config)
    source = data.pop("source")
    resolved = _resolved(config)
    if as_json:
        click.echo(json.dumps({"source": source, "config": data, "resolved": resolved}, indent=2))
        return
    click.echo(f"# source: {source}")
    for key, value in resolved.items():
        click.echo(f"# resolved {key}: {value or '-'}")
    click.echo()
    _print_toml(data)
