"""Setting a config's keys from text: `--set section.key=value`, nested mappings from a file, type checks.

Every bad key or value is a `ConfigError` with one line that names it (the key's full dotted path and where it
came from: `--set`, a file), raised before any process group exists. Works on any tree of dataclasses; the job
config's two free-form mappings are special: `model.overrides` (CoCaConfig fields, each checked against
CoCaConfig) and `parallel.deepspeed_overrides` (DeepSpeed JSON keys, kept flat as dotted paths).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

from megacoca.config.model import CoCaConfig

_YAML_TRUE, _YAML_FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")


class ConfigError(ValueError):
    """A bad job configuration: the message is one line and names the key or value at fault."""


def parse_set(assignment: str) -> tuple[str, Any]:
    """`section.key=value` -> (`section.key`, value parsed as YAML: 3, 1e-4, true, [0.9, 0.95], null)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. schedule.steps=10), got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def parse_model_overrides(assignments: list[str], where: str) -> dict[str, Any]:
    """`FIELD=VALUE` strings (e.g. `megacoca eval --model-set`) -> CoCaConfig overrides, each field name and value
    checked against CoCaConfig's fields and types; a bad one is a one-line ConfigError naming `where`."""
    overrides = {}
    for assignment in assignments:
        name, sep, _ = assignment.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{where} expects FIELD=VALUE (e.g. vocab_size=512), got {assignment!r}")
        name, value = parse_set(assignment)
        overrides[name] = _check_model_override(name, value, f"{where} {name}")
    return overrides


def apply_nested(root: Any, values: dict, prefix: str = "", where: str = "") -> None:
    """Apply a nested mapping of overrides key by key, so each bad key is named with its full path."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        target = _lookup(root, path, where) if not path.startswith(DEEPSPEED_OVERRIDES + ".") else None
        if isinstance(value, dict) and (dataclasses.is_dataclass(target) or isinstance(target, dict)) \
                and path != DEEPSPEED_OVERRIDES:
            apply_nested(root, value, prefix=f"{path}.", where=where)
        else:
            set_key(root, path, value, where=where)


def _label(key: str, where: str) -> str:
    if where.startswith("--"):
        return f"{where} {key}"
    return f"{where}: {key}" if where else key


def _lookup(root: Any, key: str, where: str = "", label: str | None = None) -> Any:
    obj = root
    for i, part in enumerate(key.split(".")):
        if isinstance(obj, dict):
            obj = obj.get(part)
            continue
        _check_key(obj, part, ".".join(key.split(".")[: i + 1]), label or _label(key, where))
        obj = getattr(obj, part)
    return obj


DEEPSPEED_OVERRIDES = "parallel.deepspeed_overrides"


def flatten_keys(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested DeepSpeed JSON keys as dotted paths."""
    flat = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_keys(value, path + "."))
        else:
            flat[path] = value
    return flat


def _set_deepspeed_override(root: Any, key: str, value: Any, label: str) -> None:
    """`parallel.deepspeed_overrides[.json.path]` = value: kept flat as dotted DeepSpeed JSON paths."""
    overrides = root.parallel.deepspeed_overrides
    path = key[len(DEEPSPEED_OVERRIDES) + 1:]
    if not path:  # the whole mapping at once (a config file, or --set parallel.deepspeed_overrides={...})
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping of DeepSpeed JSON keys, got {value!r}")
        root.parallel.deepspeed_overrides = flatten_keys(value)
        return
    if isinstance(value, dict) and value:
        overrides.update(flatten_keys(value, path + "."))
    else:
        overrides[path] = value


def set_key(root: Any, key: str, value: Any, where: str = "") -> None:
    """Set a dotted key (`optim.lr`, `model.overrides.vision_width`) with type checking and one-line errors."""
    label = _label(key, where)
    if (key == DEEPSPEED_OVERRIDES or key.startswith(DEEPSPEED_OVERRIDES + ".")) and hasattr(root, "parallel"):
        _set_deepspeed_override(root, key, value, label)
        return
    parent_key, _, last = key.rpartition(".")
    obj = _lookup(root, parent_key, where, label) if parent_key else root
    if isinstance(obj, dict):
        if obj is getattr(getattr(root, "model", None), "overrides", None):  # CoCaConfig fields: checked
            value = _check_model_override(last, value, label)
        obj[last] = value
        return
    _check_key(obj, last, key, label)
    current = getattr(obj, last)
    if dataclasses.is_dataclass(current):
        first = dataclasses.fields(current)[0].name
        raise ConfigError(f"{label}: is a section, not a value; set one of its keys, e.g. {key}.{first}")
    hint = typing.get_type_hints(type(obj))[last]
    setattr(obj, last, coerce(value, hint, label))


def _check_model_override(name: str, value: Any, label: str) -> Any:
    if name not in {f.name for f in dataclasses.fields(CoCaConfig)}:
        raise ConfigError(f"unknown CoCaConfig field in {label!r}")
    return coerce(value, typing.get_type_hints(CoCaConfig)[name], label)


def _check_key(obj: Any, key: str, path: str, label: str) -> None:
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{label}: {path.rpartition('.')[0]} is a value, not a section")
    names = [f.name for f in dataclasses.fields(obj)]
    if key not in names:
        raise ConfigError(f"unknown config key {label!r}: no {key!r} here (known: {', '.join(names)})")


def coerce(value: Any, hint: Any, label: str) -> Any:
    """Check/convert a parsed value to a field's annotation; one-line ConfigError when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, label)
            except ConfigError:
                pass
        _mismatch(value, hint, label)
    if origin is Literal:
        if value in args:
            return value
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans: the Literal's own spelling wins
            spelled = [a for a in args if isinstance(a, str) and a.lower() in (_YAML_TRUE if value else _YAML_FALSE)]
            if len(spelled) == 1:
                return spelled[0]
        raise ConfigError(f"{label}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if hint in _SCALARS:
        return _SCALARS[hint](value, hint, label)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _coerce_dataclass(value, hint, label)
    if origin in (tuple, list):
        return _coerce_sequence(value, hint, label)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            _mismatch(value, hint, label)
        return dict(value)
    return value


def _coerce_dataclass(value: Any, hint: type, label: str) -> Any:
    """A mapping -> an instance of the dataclass `hint`, each key checked and coerced (one line naming it)."""
    if isinstance(value, hint):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{label}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}, "
                          f"got {value!r}")
    instance = hint()
    for key, item in value.items():
        names = [f.name for f in dataclasses.fields(hint)]
        if key not in names:
            raise ConfigError(f"{label}: unknown key {key!r} (known: {', '.join(names)})")
        setattr(instance, key, coerce(item, typing.get_type_hints(hint)[key], f"{label}.{key}"))
    return instance


def _mismatch(value: Any, hint: Any, label: str) -> typing.NoReturn:
    raise ConfigError(f"{label}: expected {_type_name(hint)}, got {value!r}")


def _coerce_bool(value: Any, hint: Any, label: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    _mismatch(value, hint, label)


def _coerce_int(value: Any, hint: Any, label: str) -> int:
    if isinstance(value, bool):
        _mismatch(value, hint, label)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            _mismatch(value, hint, label)
        if number.is_integer():
            return int(number)
    _mismatch(value, hint, label)


def _coerce_float(value: Any, hint: Any, label: str) -> float:
    if isinstance(value, bool):
        _mismatch(value, hint, label)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            _mismatch(value, hint, label)
    _mismatch(value, hint, label)


def _coerce_str(value: Any, hint: Any, label: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    _mismatch(value, hint, label)


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _coerce_sequence(value: Any, hint: Any, label: str) -> tuple | list:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not isinstance(value, (list, tuple)):
        _mismatch(value, hint, label)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            _mismatch(value, hint, label)
        return tuple(coerce(v, a, label) for v, a in zip(value, args))
    inner = args[0] if args else Any
    return origin(coerce(v, inner, f"{label}[{i}]" if dataclasses.is_dataclass(inner) else label)
                  for i, v in enumerate(value))


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {len(args)} numbers" if origin is tuple else "a list"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
