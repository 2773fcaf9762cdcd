"""`llmops keys create / list / revoke` and `llmops usage`: the gateway store of `serve.gateway_store`, changed
while the service runs (a worker reads a key again within `serve.key_refresh_s`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from llmops.config import ConfigError, ServeConfig, load_config
from llmops.gateway import GROUPS, GatewayStore

ConfigOption = Annotated[str, typer.Option("--config", "-c", help="YAML config file (its serve.gateway_store).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key.")]

app = typer.Typer(help="Named API keys with scopes and limits (serve.gateway_store).", no_args_is_help=True)


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _serve(config: str, overrides: list[str] | None) -> ServeConfig:
    return load_config(config, overrides).serve


def store_of(cfg: ServeConfig, create: bool = False) -> GatewayStore:
    location = cfg.gateway_store
    if location is None:
        raise ConfigError("serve.gateway_store is null: this config keeps no keys")
    if not create and "://" not in location and not Path(location).is_file():
        raise ConfigError(f"no gateway store at {location}: `llmops keys create` makes it with the first key")
    return GatewayStore(location)


def _split(values: str | None) -> list[str] | None:
    return [v.strip() for v in values.split(",") if v.strip()] if values else None


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="What the key stands for in metrics and usage: a team, an app.")],
    models: Annotated[str | None, typer.Option(help="Comma-separated models it may use (default: all).")] = None,
    groups: Annotated[str, typer.Option(help=f"Comma-separated route groups: {', '.join(GROUPS)}.")] = "inference",
    rpm: Annotated[int | None, typer.Option(help="Requests per minute at most.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens (prompt + completion) per minute at most.")] = None,
    budget: Annotated[int | None, typer.Option(help="Tokens per --period at most.")] = None,
    period: Annotated[str, typer.Option(help="The budget's window: day or month (UTC).")] = "day",
    config: ConfigOption = "configs/quickstart.yaml",
    overrides: SetOption = None,
) -> None:
    """Create a key and print its secret: it is shown this once, and stored hashed."""
    try:
        store = store_of(_serve(config, overrides), create=True)
        secret, key = store.create(name, _split(models), _split(groups) or [], rpm, tpm, budget, period)
    except ConfigError as error:
        _fail(error)
        return
    typer.echo(secret)
    scope = ", ".join(key.models) if key.models else "every model"
    typer.echo(f"key '{name}': {scope}; {', '.join(key.groups)} routes. Shown once: keep it now.", err=True)


@app.command("list")
def list_keys(config: ConfigOption = "configs/quickstart.yaml", overrides: SetOption = None) -> None:
    """Every key: name, the start of its secret, what it may do, its limits, whether it is revoked."""
    try:
        keys = store_of(_serve(config, overrides)).list_keys()
    except ConfigError as error:
        _fail(error)
        return
    rows = [("name", "key", "models", "groups", "rpm", "tpm", "budget", "created", "revoked")]
    for k in keys:
        rows.append(
            (
                k.name,
                k.hint + "...",
                ",".join(k.models) if k.models else "*",
                ",".join(k.groups),
                str(k.rpm or "-"),
                str(k.tpm or "-"),
                f"{k.budget}/{k.period}" if k.budget else "-",
                _when(k.created),
                _when(k.revoked) if k.revoked else "-",
            )
        )
    _table(rows)


@app.command()
def revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    config: ConfigOption = "configs/quickstart.yaml",
    overrides: SetOption = None,
) -> None:
    """Revoke a key: every worker refuses it within serve.key_refresh_s, without a restart."""
    try:
        cfg = _serve(config, overrides)
        store_of(cfg).revoke(name)
    except ConfigError as error:
        _fail(error)
        return
    typer.echo(f"key '{name}' revoked: refused within {cfg.key_refresh_s:g} s")


def usage(
    days: Annotated[int, typer.Option(help="The last this many days (UTC), today included.")] = 7,
    config: ConfigOption = "configs/quickstart.yaml",
    overrides: SetOption = None,
) -> None:
    """Requests and prompt / completion tokens by key, model and day."""
    since = (datetime.now(UTC) - timedelta(days=days - 1)).strftime("%Y-%m-%d")
    try:
        rows = store_of(_serve(config, overrides)).usage(since)
    except ConfigError as error:
        _fail(error)
        return
    table = [("day", "key", "model", "requests", "prompt tokens", "completion tokens")]
    table += [
        (r["day"], r["key_name"], r["model"], str(r["requests"]), str(r["prompt_tokens"]), str(r["completion_tokens"]))
        for r in rows
    ]
    _table(table)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
