"""Load ``airflow_settings.yaml`` (the Astro CLI format) and upsert it into Airflow's metadata DB.

The file::

    airflow:
      connections:
        - conn_id: mlflow_default        # required
          conn_type: mlflow              # required (unless conn_uri is given)
          conn_host: 127.0.0.1
          conn_schema: http
          conn_login: ...
          conn_password: ...
          conn_port: 5000                # integer
          conn_extra: {key: value}       # a mapping or a JSON-object string
          # conn_uri: scheme://...       # alternative to the fields above (not combinable with them)
      pools:
        - pool_name: spark               # required
          pool_slot: 1                   # required, integer >= 0
          pool_description: ...
      variables:
        - variable_name: decisionflow_environment   # required
          variable_value: local          # strings are stored as-is, anything else as JSON

Parsing and validation are pure Python (PyYAML only): ``load_settings`` never imports Airflow, so
``validate`` works without an Airflow install or DB. Validation is strict on purpose - a misspelled
field would otherwise silently leave a connection half-configured - and collects every problem before
raising one :class:`SettingsError` with one line per problem::

    airflow_settings.yaml:33: connections[2] (conn_id='mlflow_default'): conn_port: must be an integer, got 'abc'

Entries whose every field is empty (the placeholder that ``astro dev init`` writes) are skipped, as
the Astro CLI does.

``apply_settings`` is idempotent: an entry already in the DB with the same values is left alone, one
whose values differ is updated, a missing one is created. Nothing that is absent from the file is
deleted. Airflow-side attributes the Astro format cannot express (descriptions of connections and
variables, ``include_deferred`` and ``team_name`` of pools) are left as they are in the DB.

Command line (``decisionflow settings validate|load [--file F]`` calls :func:`main`)::

    python -m decisionflow.settings.airflow_settings validate [--file F]
    python -m decisionflow.settings.airflow_settings load [--file F]
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "AirflowSettings",
    "ConnectionSpec",
    "PoolSpec",
    "SettingsError",
    "VariableSpec",
    "apply_settings",
    "default_settings_path",
    "load_settings",
    "main",
]

SETTINGS_FILE_NAME = "airflow_settings.yaml"

# Mirrors airflow.models.connection (RE_SANITIZE_CONN_ID, CONN_ID_MAX_LEN) and the column sizes of the
# metadata DB (models.base.ID_LEN for variable keys, String(256) for pool names), so that a bad id is
# reported here with its line number instead of failing - or being silently dropped - at load time.
_CONN_ID_RE = re.compile(r"^[\w#!()\-.:/\\]{1,}$")
_CONN_ID_MAX_LEN = 250
_VARIABLE_KEY_MAX_LEN = 250
_POOL_NAME_MAX_LEN = 256

_SECTIONS = ("connections", "pools", "variables")
_CONNECTION_FIELDS = (
    "conn_id",
    "conn_type",
    "conn_host",
    "conn_schema",
    "conn_login",
    "conn_password",
    "conn_port",
    "conn_uri",
    "conn_extra",
)
_POOL_FIELDS = ("pool_name", "pool_slot", "pool_description")
_VARIABLE_FIELDS = ("variable_name", "variable_value")
_ID_FIELD = {"connections": "conn_id", "pools": "pool_name", "variables": "variable_name"}
_ALLOWED_FIELDS = {"connections": _CONNECTION_FIELDS, "pools": _POOL_FIELDS, "variables": _VARIABLE_FIELDS}


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionSpec:
    """One Airflow connection, with Airflow's field names. ``extra`` is already a dict."""

    conn_id: str
    conn_type: str | None = None  # None only when ``uri`` is set (the URI scheme is the type)
    host: str | None = None
    schema: str | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    port: int | None = None
    extra: dict[str, Any] | None = None
    uri: str | None = field(default=None, repr=False)  # may embed a password

    def extra_json(self) -> str | None:
        """``extra`` as Airflow stores it (a JSON object), or None."""
        return json.dumps(self.extra) if self.extra else None


@dataclass(frozen=True)
class PoolSpec:
    name: str
    slots: int
    description: str | None = None


@dataclass(frozen=True)
class VariableSpec:
    key: str
    value: Any = ""  # a string, or anything JSON-serialisable

    @property
    def stored_value(self) -> str:
        """The string written to Airflow: strings verbatim, anything else as JSON (read it back with
        ``Variable.get(key, deserialize_json=True)``)."""
        if self.value is None:
            return ""
        if isinstance(self.value, str):
            return self.value
        # indent=2: what Variable.set(..., serialize_json=True) writes, so both tools agree.
        return json.dumps(self.value, indent=2)


@dataclass(frozen=True)
class AirflowSettings:
    connections: tuple[ConnectionSpec, ...] = ()
    pools: tuple[PoolSpec, ...] = ()
    variables: tuple[VariableSpec, ...] = ()
    path: Path | None = None

    def connection(self, conn_id: str) -> ConnectionSpec:
        for spec in self.connections:
            if spec.conn_id == conn_id:
                return spec
        raise KeyError(conn_id)

    def pool(self, name: str) -> PoolSpec:
        for spec in self.pools:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def variable(self, key: str) -> VariableSpec:
        for spec in self.variables:
            if spec.key == key:
                return spec
        raise KeyError(key)


class SettingsError(NonRetryableError, ValueError):
    """The settings file is missing or invalid. ``errors`` holds one message per problem, each naming
    the file (and line), the entry and the field; ``str(exc)`` is all of them, one per line."""

    def __init__(self, path: Path | str, errors: list[str]):
        self.path = Path(path)
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def default_settings_path() -> Path:
    from decisionflow.config import project_home

    return project_home() / SETTINGS_FILE_NAME


# --------------------------------------------------------------------------------------------------
# YAML with line numbers and duplicate-key detection
# --------------------------------------------------------------------------------------------------


class _Map(dict):
    """A YAML mapping that remembers where it and each of its keys came from (1-based lines)."""

    line: int | None = None
    key_lines: dict[Any, int]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_lines = {}


class _Loader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self.duplicate_keys: list[tuple[int, Any]] = []


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)  # YAML merge keys (<<)
    mapping = _Map()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found an unhashable key", key_node.start_mark
            ) from None
        line = key_node.start_mark.line + 1
        if key in mapping:
            loader.duplicate_keys.append((line, key))
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[key] = line
    return mapping


class _Seq(list):
    """A YAML sequence that remembers the (1-based) line of each item."""

    item_lines: list[int]


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    seq = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    seq.item_lines = [child.start_mark.line + 1 for child in node.value]
    return seq


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _plain(value: Any) -> Any:
    """Deep copy of a parsed value with plain dicts/lists (no line bookkeeping)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _type_name(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return type(value).__name__


def _suggest(name: Any, allowed: tuple[str, ...]) -> str:
    text = str(name)
    # `value` -> `variable_value`, `host` -> `conn_host`: the Airflow name without the Astro prefix.
    close = [a for a in allowed if a.endswith("_" + text)] or difflib.get_close_matches(text, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}allowed: {', '.join(allowed)}"


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


class _Errors:
    def __init__(self, path: Path):
        self.path = path
        self.items: list[str] = []

    def add(self, message: str, *, line: int | None = None, where: str | None = None) -> None:
        location = f"{self.path}:{line}" if line else f"{self.path}"
        where_part = f" {where}:" if where else ""
        self.items.append(f"{location}:{where_part} {message}")


class _Entry:
    """Validation context for one list entry: knows how to name itself and where its fields are."""

    def __init__(self, errors: _Errors, section: str, index: int, raw: _Map):
        self.errors = errors
        self.raw = raw
        id_field = _ID_FIELD[section]
        ident = raw.get(id_field)
        self.where = f"{section}[{index}]"
        if isinstance(ident, str) and ident:
            self.where += f" ({id_field}={ident!r})"
        self.ok = True

    def error(self, name: str | None, message: str) -> None:
        self.ok = False
        line = self.raw.key_lines.get(name, self.raw.line) if name else self.raw.line
        self.errors.add(f"{name}: {message}" if name else message, line=line, where=self.where)

    def present(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def required_str(self, name: str, *, max_len: int | None = None) -> str | None:
        if not self.present(name):
            self.error(name, "required field is missing")
            return None
        return self.optional_str(name, max_len=max_len, allow_empty=False)

    def optional_str(self, name: str, *, max_len: int | None = None, allow_empty: bool = True) -> str | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(name, f"must be a string, got {value!r} ({_type_name(value)}); quote it in YAML")
            return None
        if not value and not allow_empty:
            self.error(name, "must not be empty")
            return None
        if max_len is not None and len(value) > max_len:
            self.error(name, f"must be at most {max_len} characters, got {len(value)}")
            return None
        return value

    def integer(self, name: str, *, required: bool, minimum: int | None = None, maximum: int | None = None,
                what: str = "an integer") -> int | None:
        value = self.raw.get(name)
        if value is None:
            if required:
                self.error(name, "required field is missing")
            return None
        # bool is an int subclass: `conn_port: yes` must not become port 1.
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(name, f"must be {what}, got {value!r}")
            return None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            self.error(name, f"must be {what}, got {value!r}")
            return None
        return value

    def unknown_fields(self, allowed: tuple[str, ...]) -> None:
        for name in self.raw:
            if name not in allowed:
                self.error(name, f"unknown field ({_suggest(name, allowed)})")


def _check_json(entry: _Entry, name: str, value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        entry.error(name, f"must be JSON-serialisable: {exc}")
        return False
    return True


def _parse_extra(entry: _Entry) -> dict[str, Any] | None:
    value = entry.raw.get("conn_extra")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            entry.error("conn_extra", f"is a string but not valid JSON ({exc.msg} at char {exc.pos})")
            return None
        if not isinstance(value, dict):
            entry.error("conn_extra", f"a JSON string must hold a JSON object, got {_type_name(value)}")
            return None
        return value
    if not isinstance(value, Mapping):
        entry.error("conn_extra", f"must be a mapping or a JSON-object string, got {_type_name(value)}")
        return None
    bad_keys = [k for k in value if not isinstance(k, str)]
    if bad_keys:
        entry.error("conn_extra", f"keys must be strings, got {bad_keys[0]!r}; quote it in YAML")
        return None
    value = _plain(value)
    if not _check_json(entry, "conn_extra", value):
        return None
    return value or None


def _connection(entry: _Entry) -> ConnectionSpec | None:
    conn_id = entry.required_str("conn_id", max_len=_CONN_ID_MAX_LEN)
    if conn_id is not None and not _CONN_ID_RE.match(conn_id):
        entry.error("conn_id", f"{conn_id!r} may only contain letters, digits and #!()-.:/\\_")
    uri = entry.optional_str("conn_uri", allow_empty=True) or None
    fields_with_uri = [
        n for n in ("conn_type", "conn_host", "conn_schema", "conn_login", "conn_password", "conn_port", "conn_extra")
        if entry.raw.get(n) not in (None, "")
    ]
    if uri is not None:
        if "://" not in uri or not uri.split("://", 1)[0]:
            entry.error("conn_uri", "must look like 'scheme://[login:password@]host[:port][/schema][?extra]'")
        if fields_with_uri:
            entry.error(
                "conn_uri",
                f"cannot be combined with {', '.join(fields_with_uri)}: Airflow builds a connection from "
                "either a URI or its fields",
            )
        conn_type = None
    else:
        conn_type = entry.required_str("conn_type")
    spec = ConnectionSpec(
        conn_id=conn_id or "",
        conn_type=conn_type,
        host=entry.optional_str("conn_host"),
        schema=entry.optional_str("conn_schema"),
        login=entry.optional_str("conn_login"),
        password=entry.optional_str("conn_password"),
        port=entry.integer("conn_port", required=False, minimum=1, maximum=65535,
                           what="an integer (a TCP port, 1-65535)"),
        extra=_parse_extra(entry),
        uri=uri,
    )
    return spec if entry.ok else None


def _pool(entry: _Entry) -> PoolSpec | None:
    spec = PoolSpec(
        name=entry.required_str("pool_name", max_len=_POOL_NAME_MAX_LEN) or "",
        slots=entry.integer("pool_slot", required=True, minimum=0, what="a non-negative integer") or 0,
        description=entry.optional_str("pool_description"),
    )
    return spec if entry.ok else None


def _variable(entry: _Entry) -> VariableSpec | None:
    key = entry.required_str("variable_name", max_len=_VARIABLE_KEY_MAX_LEN)
    value = _plain(entry.raw.get("variable_value"))
    if value is not None and not isinstance(value, str):
        _check_json(entry, "variable_value", value)
    spec = VariableSpec(key=key or "", value="" if value is None else value)
    return spec if entry.ok else None


_BUILDERS: dict[str, Callable[[_Entry], Any]] = {
    "connections": _connection,
    "pools": _pool,
    "variables": _variable,
}


def _validate(data: Any, errors: _Errors) -> dict[str, list[Any]]:
    result: dict[str, list[Any]] = {name: [] for name in _SECTIONS}
    if data is None:
        errors.add("the file is empty; expected a mapping with an 'airflow:' key")
        return result
    if not isinstance(data, _Map):
        errors.add(f"top level must be a mapping with an 'airflow:' key, got {_type_name(data)}", line=1)
        return result
    for key in data:
        if key != "airflow":
            errors.add(f"top level: unknown key {key!r} (allowed: airflow)", line=data.key_lines.get(key))
    if "airflow" not in data:
        errors.add("top level: missing the 'airflow:' key", line=data.line)
        return result
    airflow = data["airflow"]
    if airflow is None:
        return result
    if not isinstance(airflow, _Map):
        errors.add(f"airflow: must be a mapping of {', '.join(_SECTIONS)}, got {_type_name(airflow)}",
                   line=data.key_lines.get("airflow"))
        return result
    for key in airflow:
        if key not in _SECTIONS:
            errors.add(f"airflow: unknown key {key!r} ({_suggest(key, _SECTIONS)})", line=airflow.key_lines.get(key))

    for section in _SECTIONS:
        entries = airflow.get(section)
        if entries is None:
            continue
        section_line = airflow.key_lines.get(section)
        if not isinstance(entries, list):
            errors.add(f"airflow.{section}: must be a list of entries ('- ...'), got {_type_name(entries)}",
                       line=section_line)
            continue
        allowed = _ALLOWED_FIELDS[section]
        id_field = _ID_FIELD[section]
        first_index: dict[str, int] = {}
        for index, raw in enumerate(entries):
            if not isinstance(raw, _Map):
                item_lines = getattr(entries, "item_lines", None)
                errors.add(f"{section}[{index}]: must be a mapping of {', '.join(allowed)}, got {_type_name(raw)}",
                           line=item_lines[index] if item_lines else section_line)
                continue
            if all(value in (None, "") for value in raw.values()) and all(k in allowed for k in raw):
                continue  # the empty placeholder of `astro dev init`
            entry = _Entry(errors, section, index, raw)
            entry.unknown_fields(allowed)
            spec = _BUILDERS[section](entry)
            ident = raw.get(id_field)
            if isinstance(ident, str) and ident:
                if ident in first_index:
                    entry.error(id_field, f"duplicate of {section}[{first_index[ident]}]")
                    spec = None
                else:
                    first_index[ident] = index
            if spec is not None:
                result[section].append(spec)
    return result


def load_settings(path: str | Path | None = None) -> AirflowSettings:
    """Parse and validate an Astro-format settings file (default: ``<project home>/airflow_settings.yaml``).

    Raises :class:`SettingsError` listing every problem found.
    """
    path = Path(path) if path is not None else default_settings_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(path, [f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(path, [f"{path}: cannot read: {exc}"]) from None

    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else f"{path}"
        detail = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise SettingsError(path, [f"{where}: YAML syntax error: {detail}"]) from None
    except yaml.YAMLError as exc:
        raise SettingsError(path, [f"{path}: YAML syntax error: {exc}"]) from None
    finally:
        loader.dispose()

    errors = _Errors(path)
    for line, key in loader.duplicate_keys:
        errors.add(f"duplicate key {key!r} in the same mapping (YAML keeps only the last one)", line=line)
    sections = _validate(data, errors)
    if errors.items:
        # Report in file order; problems without a line (file-level) first.
        raise SettingsError(path, sorted(errors.items, key=lambda m: _line_of(m, path)))
    return AirflowSettings(
        connections=tuple(sections["connections"]),
        pools=tuple(sections["pools"]),
        variables=tuple(sections["variables"]),
        path=path,
    )


def _line_of(message: str, path: Path) -> int:
    rest = message[len(str(path)):]
    match = re.match(r":(\d+)", rest)
    return int(match.group(1)) if match else 0


# --------------------------------------------------------------------------------------------------
# Applying to Airflow's metadata DB
# --------------------------------------------------------------------------------------------------

ChangeCallback = Callable[[str, str, str], None]  # (kind, action, name), action in {"created", "updated"}


def _counts() -> dict[str, int]:
    return {"created": 0, "updated": 0, "unchanged": 0}


def _json_or_none(extra: str | None) -> Any:
    if not extra:
        return None
    try:
        return json.loads(extra) or None
    except json.JSONDecodeError:
        return extra  # a legacy non-JSON value: never equal to ours, so it gets replaced


def _apply_connections(specs, session: Session, counts, on_change: ChangeCallback | None) -> None:
    from airflow.models import Connection
    from sqlalchemy import select

    for spec in specs:
        if spec.uri:
            wanted = Connection(conn_id=spec.conn_id, uri=spec.uri)
        else:
            wanted = Connection(
                conn_id=spec.conn_id,
                conn_type=spec.conn_type,
                host=spec.host,
                schema=spec.schema,
                login=spec.login,
                password=spec.password,
                port=spec.port,
                extra=spec.extra_json(),
            )
        wanted_values = {
            "conn_type": wanted.conn_type,
            "host": wanted.host or None,
            "schema": wanted.schema or None,
            "login": wanted.login or None,
            "password": wanted.password or None,
            "port": wanted.port,
        }
        wanted_extra = wanted.extra or None

        existing = session.scalar(select(Connection).where(Connection.conn_id == spec.conn_id))
        if existing is None:
            session.add(wanted)
            counts["created"] += 1
            if on_change:
                on_change("connection", "created", spec.conn_id)
            continue

        changed = False
        for attr, value in wanted_values.items():
            if (getattr(existing, attr) or None) != value:
                changed = True
                if attr == "password" and value is None:
                    # Connection.password's setter ignores empty values; clear the column directly.
                    existing._password = None
                    existing.is_encrypted = False
                else:
                    setattr(existing, attr, value)
        if _json_or_none(existing.extra) != _json_or_none(wanted_extra):
            changed = True
            existing.extra = wanted_extra
        if changed:
            counts["updated"] += 1
            if on_change:
                on_change("connection", "updated", spec.conn_id)
        else:
            counts["unchanged"] += 1


def _apply_pools(specs, session: Session, counts, on_change: ChangeCallback | None) -> None:
    from airflow.models import Pool
    from sqlalchemy import select

    for spec in specs:
        existing = session.scalar(select(Pool).where(Pool.pool == spec.name))
        if existing is None:
            session.add(Pool(pool=spec.name, slots=spec.slots, description=spec.description,
                             include_deferred=False))
            counts["created"] += 1
            if on_change:
                on_change("pool", "created", spec.name)
            continue
        if existing.slots != spec.slots or (existing.description or None) != (spec.description or None):
            existing.slots = spec.slots
            existing.description = spec.description
            counts["updated"] += 1
            if on_change:
                on_change("pool", "updated", spec.name)
        else:
            counts["unchanged"] += 1


def _apply_variables(specs, session: Session, counts, on_change: ChangeCallback | None) -> None:
    from airflow.models import Variable
    from sqlalchemy import select

    for spec in specs:
        value = spec.stored_value
        existing = session.scalar(select(Variable).where(Variable.key == spec.key))
        if existing is None:
            session.add(Variable(key=spec.key, val=value))
            counts["created"] += 1
            if on_change:
                on_change("variable", "created", spec.key)
            continue
        if existing.val != value:
            existing.val = value
            counts["updated"] += 1
            if on_change:
                on_change("variable", "updated", spec.key)
        else:
            counts["unchanged"] += 1


def apply_settings(
    settings: AirflowSettings,
    *,
    session: Session | None = None,
    on_change: ChangeCallback | None = None,
) -> dict[str, dict[str, int]]:
    """Upsert connections, pools and variables into the Airflow metadata DB.

    With ``session=None`` a session is opened and committed here; with a session given, the changes
    are flushed into it and the caller commits. Returns
    ``{"connections"|"pools"|"variables": {"created": n, "updated": n, "unchanged": n}}``.
    ``on_change(kind, action, name)`` is called for every created or updated entry.
    """
    if session is None:
        from airflow.utils.session import create_session

        with create_session() as own_session:
            return apply_settings(settings, session=own_session, on_change=on_change)

    result = {"connections": _counts(), "pools": _counts(), "variables": _counts()}
    _apply_connections(settings.connections, session, result["connections"], on_change)
    _apply_pools(settings.pools, session, result["pools"], on_change)
    _apply_variables(settings.variables, session, result["variables"], on_change)
    session.flush()
    return result


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _summary(settings: AirflowSettings) -> str:
    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    return ", ".join((n(len(settings.connections), "connection"), n(len(settings.pools), "pool"),
                      n(len(settings.variables), "variable")))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decisionflow settings",
        description="Validate airflow_settings.yaml, or upsert its connections, pools and variables "
                    "into the Airflow metadata DB.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    for action, help_text in (
        ("validate", "check the file; does not need Airflow"),
        ("load", "validate, then create or update the entries in Airflow's DB (idempotent)"),
    ):
        cmd = sub.add_parser(action, help=help_text)
        cmd.add_argument("--file", "-f", type=Path, default=None,
                         help=f"settings file (default: <project home>/{SETTINGS_FILE_NAME})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``validate|load [--file F]``. Returns 0 on success, 1 on invalid settings or a DB failure,
    2 on a usage error."""
    try:
        args = _build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2

    path = args.file if args.file is not None else default_settings_path()
    try:
        settings = load_settings(path)
    except SettingsError as exc:
        count = len(exc.errors)
        print(f"error: {path}: {count} problem{'' if count == 1 else 's'}:", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return 1

    if args.action == "validate":
        print(f"{path}: OK ({_summary(settings)})")
        return 0

    def report(kind: str, action: str, name: str) -> None:
        print(f"{action} {kind} {name}")

    try:
        result = apply_settings(settings, on_change=report)
    except Exception as exc:  # noqa: BLE001 - a DB failure must end as a message and an exit code
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(exc, SQLAlchemyError):
            raise
        print(
            f"error: could not write to the Airflow metadata DB ({type(exc).__name__}: {exc}).\n"
            "Is AIRFLOW_HOME / AIRFLOW__DATABASE__SQL_ALCHEMY_CONN pointing at a migrated DB "
            "(`airflow db migrate`)?",
            file=sys.stderr,
        )
        return 1
    for kind, counts in result.items():
        print(f"{kind}: {counts['created']} created, {counts['updated']} updated, "
              f"{counts['unchanged']} unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
