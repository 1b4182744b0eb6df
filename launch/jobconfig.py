"""Job settings from a YAML file and the command line, checked against the job's dataclass.

Precedence: the dataclass defaults, then the YAML file (``--config``), then options given on
the command line. Unknown keys and values of the wrong type are errors that name the key,
the value and what is allowed.

A job that trains with BregTop nests its settings record: a field ``optimizer:
BregTopConfig``. In YAML it is a mapping under ``optimizer:`` whose keys are
:class:`~bregtop_dist.BregTopConfig`'s fields; on the command line each field is an option
of its own (``--lr``, ``--betas 0.9,0.98``), with BregTopConfig's own documentation as help.
Fields the job decides itself (its ``OPTIMIZER_OWN``, such as the method of each row) are
not among them. With a DeepSpeed JSON (the job's ``deepspeed`` setting) the JSON's optimizer
block comes between BregTop's defaults and the YAML file; a job-own field it names (the
shipped JSONs name ``method``) becomes the job's setting unless the YAML or command line set it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
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
    elif typing.get_origin(kind) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            try:
                return tuple(float(v) for v in items)
            except (TypeError, ValueError):
                pass
        raise ConfigError(f"{name}={value!r} must be comma-separated numbers (\"0.9,0.98\")")
    else:
        return value
    raise ConfigError(f"{name}={value!r} must be of type {getattr(kind, '__name__', kind)}")


OPTIMIZER_FIELD = "optimizer"
"""The name of the nested BregTop settings in a job's dataclass (and in its YAML files)."""


def optimizer_options(cls: type) -> tuple[str, ...]:
    """The BregTopConfig fields a job takes from YAML and the command line: all but the ones it
    decides itself (``OPTIMIZER_OWN``); empty for a job without the nested record."""
    if OPTIMIZER_FIELD not in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
        return ()
    own = getattr(cls, "OPTIMIZER_OWN", ())
    return tuple(name for name in _optimizer_class().field_names() if name not in own)


def _optimizer_class() -> Any:
    from bregtop_dist import BregTopConfig

    return BregTopConfig


def from_sources(cls: type[T], path: Path | None, args: argparse.Namespace) -> T:
    """An instance of dataclass ``cls`` from its defaults, the YAML file ``path`` and the
    command-line options in ``args`` that were given (not None)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    nested = optimizer_options(cls)
    values: dict[str, Any] = {}
    block: dict[str, Any] = {}
    if path is not None:
        import yaml

        if not Path(path).is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - set(names))
        if unknown:
            hint = f" (BregTop's settings go under {OPTIMIZER_FIELD}:)" if unknown[0] in nested else ""
            raise ConfigError(f"config file {str(path)!r}: unknown setting {unknown[0]!r}{hint}; allowed: {', '.join(names)}")
        block = _yaml_block(path, loaded.pop(OPTIMIZER_FIELD, None), nested, cls)
        values.update({k: _coerce(f"{path}: {k}", v, hints[k]) for k, v in loaded.items()})
    for name in names:
        given = getattr(args, name, None)
        if given is not None and name != OPTIMIZER_FIELD:
            values[name] = _coerce(f"--{name.replace('_', '-')}", given, hints[name])
    if nested:
        kinds = typing.get_type_hints(_optimizer_class())
        for name in nested:
            given = getattr(args, name, None)
            if given is not None:
                block[name] = _coerce(f"--{name.replace('_', '-')}", given, kinds[name])
    try:
        if nested:
            settings, named = _optimizer(block, values.get("deepspeed"), path, getattr(cls, "OPTIMIZER_OWN", ()))
            for name, value in named.items():  # the JSON's method (exponent) unless the YAML or command line set it
                if name not in names:
                    raise ConfigError(f"--deepspeed: optimizer.params.{name} is decided by the job; remove it from the JSON")
                values.setdefault(name, _coerce(f"--deepspeed: optimizer.params.{name}", value, hints[name]))
            values[OPTIMIZER_FIELD] = settings
        return cls(**values)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _yaml_block(path: Path, block: Any, nested: tuple[str, ...], cls: type) -> dict[str, Any]:
    """The YAML file's ``optimizer:`` mapping, its keys checked against the fields a job takes."""
    if block is None:
        return {}
    if not nested:
        raise ConfigError(f"config file {str(path)!r}: unknown setting {OPTIMIZER_FIELD!r}")
    if not isinstance(block, dict):
        raise ConfigError(f"config file {str(path)!r}: {OPTIMIZER_FIELD} must be a mapping of BregTop settings, "
                          f"got {type(block).__name__}")
    for key in block:
        if key not in nested:
            own = key in getattr(cls, "OPTIMIZER_OWN", ())
            raise ConfigError(
                f"config file {str(path)!r}: {OPTIMIZER_FIELD}.{key} "
                + (f"is the job's own setting: set {key} at the top level" if own else
                   f"is not a BregTop setting; allowed: {', '.join(nested)}")
            )
    return dict(block)


def _optimizer(block: dict[str, Any], deepspeed: Path | None, path: Path | None,
               own: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """BregTopConfig from its defaults, a DeepSpeed JSON's optimizer block, then ``block``; and
    the settings in ``own`` (the job's, such as ``method``) that the JSON's block names, which
    the job takes where its YAML and command line do not set them."""
    base: dict[str, Any] = {}
    named: dict[str, Any] = {}
    if deepspeed is not None:
        from bregtop_dist.integrations.deepspeed import load_config, optimizer_block

        try:
            config = load_config(deepspeed)
            base = optimizer_block(config).settings.as_defaults()
        except (OSError, ValueError) as err:
            raise ConfigError(f"--deepspeed: {err}") from None
        given = config["optimizer"].get("params") or {}
        named = {k: given[k] for k in own if k in given}
        base = {k: v for k, v in base.items() if k not in own}
    where = f"config file {str(path)!r}: {OPTIMIZER_FIELD}" if path is not None else "BregTop settings"
    return _optimizer_class().from_mapping({**base, **block}, where=where), named


def field_docs(cls: type) -> dict[str, str]:
    """The first sentence of each field's docstring (the string literal under it) in the
    source of dataclass ``cls``: BregTopConfig's documentation, read once for ``--help``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            text = " ".join(after.value.value.split())
            docs[node.target.id] = text.split(". ")[0].rstrip(".")
    return docs


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
        if f.name != OPTIMIZER_FIELD:
            _add_option(parser, f.name, hints[f.name], helps.get(f.name), f.default)
    nested = optimizer_options(cls)
    if nested:
        options = parser.add_argument_group(
            "BregTop settings", f"the fields of bregtop_dist.BregTopConfig; in YAML under {OPTIMIZER_FIELD}:")
        config = _optimizer_class()
        kinds, docs = typing.get_type_hints(config), field_docs(config)
        for name in nested:
            _add_option(options, name, kinds[name], docs.get(name), config.__dataclass_fields__[name].default)
    return parser


def _add_option(parser: Any, name: str, kind: Any, text: str | None, default: Any) -> None:
    """``--name`` (``--name/--no-name`` for a bool), defaulting to None so that given and not
    given can be told apart."""
    flag = "--" + name.replace("_", "-")
    shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
    text = f"{text} (default {shown})" if text else f"(default {shown})"
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    else:
        parser.add_argument(flag, type=kind if kind in (int, float) else str, default=None, help=text)


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
