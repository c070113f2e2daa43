"""What stops a service from starting, said in one line with the fix (not a traceback whose cause
is on its last line): a database that does not exist, a PostgreSQL that cannot be reached, a
database URL the service cannot use, a SQLite file or data folder it cannot write."""

from __future__ import annotations

import difflib
import os
import re
import socket
import sqlite3
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pydantic
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from runtime.config import SecuritySettings, ServiceSettings
from runtime.outages import DatabaseRefused, causes

_UNKNOWN_REVISION = re.compile(r"Can't locate revision identified by '([^']+)'")
"""Alembic's error for a database stamped with a revision this code's history lacks."""


def _where(url: str) -> str:
    parsed = make_url(url)
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}"


def explain(error: BaseException, service: str, settings: ServiceSettings) -> str | None:
    """One line saying why `service` could not start and what to do; None if `error` is not a
    known start-up problem (then its traceback is what helps)."""
    variable = f"{settings.env_prefix}DATABASE_URL"
    url = settings.database_url
    for cause in causes(error):
        newer = _UNKNOWN_REVISION.search(str(cause))
        if newer and type(cause).__module__.startswith("alembic"):  # not imported here: ~11 MB
            where = make_url(settings.resolved_database_url()).render_as_string(hide_password=True)
            return (
                f"{service}: the database ({where}) is at schema revision {newer[1]}, which this "
                "code does not know: a newer release migrated it. Run that release (or a newer "
                "one), or first downgrade the database with that release's migrations (`alembic "
                "downgrade`)"
            )
        if isinstance(cause, sqlite3.OperationalError) and "unable to open" in str(cause):
            path = make_url(settings.resolved_database_url()).database or "?"
            return (
                f"{service}: cannot open the SQLite file {path}: its folder does not exist or the "
                f"service cannot write it; point {variable} at a folder it can write (or leave it "
                f"unset for one in {settings.env_prefix}DATA_DIR / COINS_DATA_DIR)"
            )
        if isinstance(cause, OSError) and _inside(cause.filename, settings.data_dir):
            return (
                f"{service}: cannot use the data folder {settings.data_dir} "
                f"({cause.strerror or cause}): set {settings.env_prefix}DATA_DIR (or COINS_DATA_DIR "
                "for every service) to a folder the service can create and write"
            )
        if isinstance(cause, asyncpg.exceptions.InvalidCatalogNameError):
            name = make_url(url).database if url else "?"
            return (
                f"{service}: the database {name!r} does not exist on {_where(url)}: create it "
                f"(createdb -h {make_url(url).host or 'localhost'} -U "
                f"{make_url(url).username or 'postgres'} {name}) or point {variable} at one"
            )
        if isinstance(
            cause,
            asyncpg.exceptions.InvalidPasswordError
            | asyncpg.InvalidAuthorizationSpecificationError,
        ):
            return (
                f"{service}: PostgreSQL at {_where(url)} refused the login in {variable}: {cause}"
            )
        if (
            url
            and isinstance(cause, ConnectionRefusedError | OSError)
            and not isinstance(cause, FileNotFoundError | PermissionError)
        ):
            return (
                f"{service}: cannot reach PostgreSQL at {_where(url)} ({cause.strerror or cause}): "
                f"is it running? (or point {variable} elsewhere; unset, the service uses a SQLite "
                "file)"
            )
        if isinstance(cause, sa_exc.NoSuchModuleError | sa_exc.ArgumentError) or (
            url and isinstance(cause, ModuleNotFoundError)
        ):
            return (
                f"{service}: {variable}={url!r} is not a database URL the service can use: write "
                "postgresql://user@host:port/name (or leave it unset for a SQLite file)"
            )
    for cause in causes(error):  # after the refusals named above, which it wraps
        if isinstance(cause, asyncpg.exceptions.TooManyConnectionsError):
            return (
                f"{service}: PostgreSQL at {_where(url)} has no connection left ({cause}): "
                "start again once others close, or raise its max_connections (each replica "
                f"opens up to twice {variable.removesuffix('URL')}CONNECTIONS)"
            )
        if isinstance(cause, DatabaseRefused):
            return (
                f"{service}: PostgreSQL at {_where(url)} refuses connections to the database in "
                f"{variable} ({cause}): start again once it takes them (ALLOW_CONNECTIONS, "
                "max_connections, the login's CONNECT right)"
            )
    return None


def _inside(filename: object, folder: Path) -> bool:
    """Whether an OSError's file is `folder` or in it (a data folder that cannot be made or
    written, not any missing file)."""
    if not isinstance(filename, str | Path):
        return False
    path, folder = Path(filename).absolute(), folder.absolute()
    return path == folder or folder in path.parents


def explain_settings(error: pydantic.ValidationError, service: str, env_prefix: str) -> str:
    """A configuration the service refuses, one line per bad variable: its name, what it was set
    to, and what it must be (not pydantic's traceback)."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        what = problem["msg"].removeprefix("Value error, ")
        if field:
            given = problem.get("input")
            lines.append(f"{service}: {env_prefix}{field.upper()}={given!s}: {what}")
        else:
            lines.append(f"{service}: bad configuration: {what}")
    return "\n".join(lines)


def refused_settings(settings_type: type[ServiceSettings], service: str) -> list[str]:
    """Every variable the service would refuse, one line each, named as it is set: the shared
    COINS_* ones (SecuritySettings, built inside the service's settings, whose first refusal would
    otherwise hide the service's own and be named with the service's prefix) and the service's."""
    lines: list[str] = []
    try:
        SecuritySettings()
        shared_ok = True
    except pydantic.ValidationError as error:
        lines += explain_settings(error, service, "COINS_").splitlines()
        shared_ok = False
    # Without the shared ones: the service's own variables, beside shared settings at their defaults.
    base: dict[str, Any] = {} if shared_ok else {"security": SecuritySettings.model_construct()}
    prefix = str(settings_type.model_config.get("env_prefix", ""))
    try:
        settings_type(**base)
    except pydantic.ValidationError as error:
        lines += explain_settings(error, service, prefix).splitlines()
        # A rule across settings (a model validator) runs only once every field is valid: run it
        # again with the refused fields at their defaults, so that it is named now, not after a fix.
        fields = settings_type.model_fields
        refused = {str(p["loc"][0]) for p in error.errors() if p["loc"]} & set(fields)
        defaults = {name: fields[name].get_default(call_default_factory=True) for name in refused}
        try:
            if defaults:
                settings_type(**base, **defaults)
        except pydantic.ValidationError as rules:
            lines += [
                line
                for line in explain_settings(rules, service, prefix).splitlines()
                if line not in lines
            ]
    return lines


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def settings_or_exit(settings_type: type[SettingsT], service: str, *, code: int = 1) -> SettingsT:
    """A tool's copy of a service's settings (the migration job, the cross audit, the ledger
    audit), or the refusal the service itself would print (one line per variable, named as set,
    not pydantic's traceback) and exit `code`."""
    try:
        return settings_type()
    except pydantic.ValidationError:
        print("\n".join(refused_settings(settings_type, service)), file=sys.stderr)
        raise SystemExit(code) from None


def mistyped_settings(
    service: str, settings_type: type[pydantic.BaseModel], environ: Mapping[str, str] = os.environ
) -> list[str]:
    """Variables that look like a misspelt setting of the service (PAYOUT_MATURATION_DAY), each
    with the setting meant: settings ignore unknown variables (Kubernetes adds some of its own), so
    a typo would otherwise leave the default in force without a word."""
    prefix = str(settings_type.model_config.get("env_prefix", ""))
    known = {prefix + name.upper() for name in settings_type.model_fields}
    lines = []
    for key in sorted(k for k in environ if k.startswith(prefix) and k not in known):
        meant = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
        if meant:
            lines.append(f"{service}: {key} is not a setting (did you mean {meant[0]}?): ignored")
    return lines


_EXPORTERS = {
    "OTEL_TRACES_EXPORTER": ("otlp", "console", "none"),
    "OTEL_METRICS_EXPORTER": ("otlp", "none"),
    "OTEL_LOGS_EXPORTER": ("otlp", "none"),
}
"""The OpenTelemetry exporters each signal can use here (runtime.telemetry, runtime.metrics)."""


def unknown_exporters(service: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """OTEL_*_EXPORTER values the service does not know (`jaeger`, a typo): said at start, since
    that signal then exports nothing."""
    lines = []
    for variable, known in _EXPORTERS.items():
        value = environ.get(variable, "").strip().lower()
        if value and value not in known:
            lines.append(
                f"{service}: {variable}={value} is not an exporter this service has "
                f"({', '.join(known)}): it exports none"
            )
    return lines


def port_held(host: str, port: int) -> bool:
    """Whether another program listens on the port. SO_REUSEADDR as the servers bind: sockets of a
    suite stopped a moment ago linger in TIME_WAIT for a minute, and hold nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except (OSError, ValueError):
            return True
    return False


def port_in_use(what: str, address: str, variable: str) -> SystemExit:
    """The one line a service stops with when a port it needs is held: which, and what moves it."""
    return SystemExit(
        f"{what}: cannot listen on {address}: the port is in use (another coins suite, or another "
        f"program?). Stop it, or move this port with {variable} (or the whole suite with "
        "COINS_PORT_BASE, e.g. COINS_PORT_BASE=60050)."
    )
