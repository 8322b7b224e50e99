"""Argument checks that run when a class is built, so a bad value fails before any work starts,
with a message naming the key and the allowed range; and ``InputError``, the error for a bad
configuration value or input file, which ``python -m icrl_lightning`` prints without a traceback."""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Iterable


class InputError(ValueError):
    """A bad configuration value or input file. The message says what is wrong (the key, file, map
    or row) and what is allowed; the command line prints it as ``error: ...`` and exits with 2."""


class MissingInputFile(InputError, FileNotFoundError):
    """An input file that does not exist."""


def exit_on_input_error(run, *args):
    """``run(*args)`` for a command-line tool: an ``InputError`` (a missing or unreadable file, a bad
    value) becomes one ``error: ...`` line on stderr and exit status 2, with no traceback."""
    try:
        return run(*args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def check_range(key: str, value, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, why: str = "") -> None:
    """Raise ``InputError`` naming ``key`` unless ``value`` lies in the interval (bounds optional;
    ``*_open`` excludes that bound). ``why`` is appended to the message (e.g. where a bound comes from)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "-inf" if lo is None else f"{lo}"
        right = "inf" if hi is None else f"{hi}"
        interval = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise InputError(f"{key}={value!r} is out of range: allowed {interval}" + (f" ({why})" if why else ""))


def check_choice(key: str, value, choices: Iterable) -> None:
    """Raise ``InputError`` naming ``key`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise InputError(f"{key}={value!r}: choose one of {', '.join(repr(c) for c in choices)}")


def read_input_file(path, what: str) -> str:
    """The text of an input file named by an option, or ``InputError`` in one line naming ``what``
    (e.g. ``"data.eval_map_file"``) and the path: missing, a folder, unreadable, empty or not text."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInputFile(f"{what}: {path} does not exist")
    if p.is_dir():
        raise InputError(f"{what}: {path} is a folder, not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except PermissionError:
        raise InputError(f"{what}: {path} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise InputError(f"{what}: {path} is not a text file (not UTF-8)") from None
    except OSError as err:
        raise InputError(f"{what}: {path} cannot be read ({err.strerror or err})") from None
    if not text.strip():
        raise InputError(f"{what}: {path} is empty")
    return text


def read_json_file(path, what: str):
    """``read_input_file`` parsed as JSON (``InputError`` naming the line and column otherwise)."""
    import json

    try:
        return json.loads(read_input_file(path, what))
    except json.JSONDecodeError as err:
        raise InputError(f"{what}: {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") \
            from None


def object_config(obj) -> dict:
    """A configured object as ``{"class_path", "init_args"}`` (what the CLI writes in a config); its
    arguments are read back from the attributes of the same names."""
    cls = type(obj)
    names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {n: getattr(obj, n) for n in names}}


def import_class(path: str, key: str) -> type:
    """The class named by a dotted ``path`` (``InputError`` naming ``key`` when it cannot be imported)."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise InputError(f"{key}: class {path!r} cannot be imported") from None


def config_object(value, base: type, key: str):
    """``value`` itself (a jsonargparse lazy default becomes a real instance of its own), or the
    object a ``{"class_path", "init_args"}`` spec describes (as saved in a checkpoint's data
    hyper-parameters)."""
    lazy_cls = getattr(value, "_lazy_class_type", None) if not isinstance(value, dict) else None
    if lazy_cls is not None:
        value = lazy_cls(**getattr(value, "_lazy_kwargs", {}))
    if isinstance(value, dict) and "class_path" in value:
        value = import_class(value["class_path"], key)(**value.get("init_args", {}))
    if not isinstance(value, base):
        raise InputError(f"{key}: expected a {base.__name__}, got {type(value).__name__}")
    return value
