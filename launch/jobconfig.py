"""Job settings from a YAML file and the command line, checked against the job's dataclass.

Precedence: the dataclass defaults, then the YAML file (``--config``), then options given on
the command line. Unknown keys and values of the wrong type are errors that name the key,
the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A settings file or value that cannot be used; the message says what to do."""


def _coerce(name: str, value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(k for k in options if k is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    else:
        return value
    raise ConfigError(f"{name}={value!r} must be of type {getattr(kind, '__name__', kind)}")


def from_sources(cls: type[T], path: Path | None, args: argparse.Namespace) -> T:
    """An instance of dataclass ``cls`` from its defaults, the YAML file ``path`` and the
    command-line options in ``args`` that were given (not None)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        if not Path(path).is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - set(names))
        if unknown:
            raise ConfigError(f"config file {str(path)!r}: unknown setting {unknown[0]!r}; allowed: {', '.join(names)}")
        values.update({k: _coerce(f"{path}: {k}", v, hints[k]) for k, v in loaded.items()})
    for name in names:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = _coerce(f"--{name.replace('_', '-')}", given, hints[name])
    try:
        return cls(**values)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def job_parser(cls: type, prog: str, description: str, config_dir: str) -> argparse.ArgumentParser:
    """A one-line-error parser with ``--config FILE`` and one option per field of dataclass
    ``cls`` (``--max-steps`` for ``max_steps``; ``--flag/--no-flag`` for booleans). Options
    default to None, so :func:`from_sources` can tell given from not given."""
    from launch.cli import OneLineParser

    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help=f"YAML file with any of the settings below ({config_dir})")
    hints = typing.get_type_hints(cls)
    helps: dict[str, str] = getattr(cls, "HELP", {})
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps[f.name]} (default {f.default})" if f.name in helps else f"(default {f.default})"
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=kind if kind in (int, float) else str, default=None, help=text)
    return parser


def parse_list(text: str, name: str, cast: type = int) -> tuple[Any, ...]:
    """The comma-separated values of a setting such as ``checkpoints="100,1000"``; an error
    names the setting and what it must hold."""
    try:
        values = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r} must be comma-separated {cast.__name__} values") from None
    if not values:
        raise ValueError(f"{name}={text!r} must list at least one {cast.__name__} value")
    return values
