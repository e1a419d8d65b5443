"""The one strict loader for everything a user hands to medstate: YAML and JSON files, plain-data configs, list
options and regular expressions. A mistake (unknown key, wrong type, missing field, bad pattern) raises a
MedstateError that names the file or option and the key, so the CLI prints one line and exits with code 2.

    read_yaml(path, "task file")                 → the parsed document
    from_data(TaskSpec, data, where="tasks.yaml: tasks[2]")   → a dataclass, every field type-checked
    load_settings(PretrainConfig, "cpt.yaml", {"train.max_steps": 5})  → a config file plus typed overrides
    parse_list("0,1,2", int, "--seeds")          → [0, 1, 2]
    compile_pattern("^LAB//", "--exclude-codes") → re.Pattern
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from medstate.errors import MedstateError

T = TypeVar("T")

# a settings field holding a path: written in a file, it is relative to the file's folder; given as an override,
# to the working directory (`field(metadata=PATH)`)
PATH = {"path": True}


def read_text(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise MedstateError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MedstateError(f"cannot read {what} {path}: {getattr(err, 'strerror', None) or err}") from None


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise MedstateError(f"{where} is not valid YAML{line}: {getattr(err, 'problem', None) or err}") from None


def read_yaml(path: str | Path, what: str) -> Any:
    return parse_yaml(read_text(path, what), f"{what} {path}")


def read_json(path: str | Path, what: str) -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MedstateError(f"{what} {path} is not valid JSON (line {err.lineno}): {err.msg}") from None


def expect_mapping(data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        raise MedstateError(f"{where} must be a mapping of names to values, got {_kind(data)}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise MedstateError(f"{where}: key {bad[0]!r} is not a name")
    return data


def from_data(cls: type[T], data: Any, where: str) -> T:
    """An instance of the dataclass `cls` from plain data: unknown keys, missing required fields and values of the
    wrong type are errors naming `where` and the key."""
    data = expect_mapping(data, where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MedstateError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise MedstateError(f"{where}: missing key(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(value, hints[name], f"{where}: {name}") for name, value in data.items()}
    try:
        return cls(**values)
    except MedstateError as err:
        raise MedstateError(f"{where}: {err}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except MedstateError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise MedstateError(errors[0])
        raise MedstateError(f"{where}: got {_kind(value)}, which fits no allowed type")
    if dataclasses.is_dataclass(hint):
        return from_data(hint, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise MedstateError(f"{where} must be a list, got {_kind(value)}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        mapping = expect_mapping(value, where)
        return {k: _coerce(v, args[1] if args else Any, f"{where}.{k}") for k, v in mapping.items()}
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is type(None):
        if value is None:
            return None
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise MedstateError(f"{where} must be {_name(hint)}, got {_kind(value)}")


def parse_list(text: str, item: type, option: str) -> list:
    """A comma-separated option value ('0,1,2') as a list of `item`s."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise MedstateError(f"{option}: expected a comma-separated list, got {text!r}")
    out = []
    for part in parts:
        try:
            out.append(item(part))
        except ValueError:
            raise MedstateError(f"{option}: {part!r} is not {_name(item)} (in {text!r})") from None
    return out


def beside(path: str | None, file: str | Path) -> str | None:
    """A path written in `file`, absolute: relative paths are relative to the file's folder."""
    return None if path is None else str((Path(file).parent / Path(path).expanduser()).resolve())


def load_settings(
    cls: type[T],
    path: str | Path | None = None,
    overrides: dict | None = None,
    what: str = "settings",
    defaults: dict | None = None,
):
    """The one way settings are taken, from the CLI and from Python alike: a YAML file (or none: the defaults) with
    typed overrides on top, checked together by `from_data`. Overrides are keyed by dotted names
    (`{"train.max_steps": 5, "init": "runs/cpt/model"}`; None values are left out). Paths (fields marked `PATH`)
    written in the file are relative to its folder, those given as overrides to the working directory. `defaults`
    (dotted, like overrides) go under the file: a caller's own defaults where they differ from the class's."""
    return from_data(cls, settings_data(cls, path, overrides, what, defaults), f"{what} {path}" if path else what)


def settings_data(
    cls: type, path: str | Path | None, overrides: dict | None = None, what: str = "settings", defaults=None
) -> dict:
    """What `load_settings` checks: the defaults, the file's mapping over them with its paths resolved, and the
    overrides put in."""
    data = expect_mapping(read_yaml(path, what) or {}, f"{what} {path}") if path is not None else {}
    data = _merged(_nested(defaults), _resolve_paths(cls, data, Path(path) if path is not None else None))
    return _merged(data, _resolve_paths(cls, _nested(overrides), Path.cwd() / "options"))


def _nested(dotted: dict | None) -> dict:
    """{"train.max_steps": 5} → {"train": {"max_steps": 5}}; None values left out, paths as strings."""
    nested: dict = {}
    for key, value in (dotted or {}).items():
        if value is None:
            continue
        *parents, name = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = str(value) if isinstance(value, Path) else value
    return nested


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve_paths(cls: Any, data: Any, file: Path | None) -> Any:
    """`data` with the PATH fields of `cls` (and of the dataclasses inside it, in lists too) made absolute beside
    `file`; anything that does not fit the shape is left for `from_data` to name."""
    if file is None or not dataclasses.is_dataclass(cls) or not isinstance(data, dict):
        return data
    hints, out = typing.get_type_hints(cls), dict(data)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        value = out[f.name]
        if f.metadata.get("path") and isinstance(value, str):
            out[f.name] = beside(value, file)
            continue
        inner = _dataclass_in(hints[f.name])
        if inner is not None and isinstance(value, list):
            out[f.name] = [_resolve_paths(inner, v, file) for v in value]
        elif inner is not None:
            out[f.name] = _resolve_paths(inner, value, file)
    return out


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (itself, optional, or as list items), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def compile_pattern(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise MedstateError(f"{where}: {pattern!r} is not a valid regular expression ({err})") from None


def _name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(hint, str(hint))


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return f"{value!r} ({type(value).__name__})"
