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

:class:`JobConfig` holds the settings, help texts and checks the BregTop-training jobs share
(``launch.lm``, ``launch.sst2``); each job's dataclass derives from it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from bregtop_dist import METHODS, BregTopConfig

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
        if typing.get_args(kind)[0] is str and isinstance(items, (list, tuple)):
            return tuple(str(v).strip() for v in items if str(v).strip())
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
    return tuple(name for name in BregTopConfig.field_names() if name not in own)


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
        kinds = typing.get_type_hints(BregTopConfig)
        for name in nested:
            given = getattr(args, name, None)
            if given is not None:
                block[name] = _coerce(f"--{name.replace('_', '-')}", given, kinds[name])
    try:
        if nested:
            settings, named = _optimizer(block, values.get("deepspeed"), getattr(cls, "OPTIMIZER_OWN", ()))
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


def _optimizer(block: dict[str, Any], deepspeed: Path | None, own: tuple[str, ...]) -> tuple[BregTopConfig, dict[str, Any]]:
    """BregTopConfig from its defaults, a DeepSpeed JSON's optimizer block, then ``block``; and
    the settings in ``own`` (the job's, such as ``method``) that the JSON's block names, which
    the job takes where its YAML and command line do not set them."""
    settings, named = BregTopConfig(), {}
    if deepspeed is not None:
        from bregtop_dist.integrations.deepspeed import load_config, optimizer_block

        try:
            config = load_config(deepspeed)
            json_settings = optimizer_block(config).settings
        except (OSError, ValueError) as err:
            raise ConfigError(f"--deepspeed: {err}") from None
        given = config["optimizer"].get("params") or {}
        named = {k: given[k] for k in own if k in given}
        own_defaults = {k: getattr(settings, k) for k in own if hasattr(settings, k)}  # the job sets these itself
        settings, block = json_settings, {**own_defaults, **block}
    return dataclasses.replace(settings, **block), named


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


def job_parser(cls: type, prog: str, description: str, config_dir: str | None = None) -> argparse.ArgumentParser:
    """A one-line-error parser with ``--config FILE`` and one option per field of dataclass
    ``cls`` (``--max-steps`` for ``max_steps``; ``--flag/--no-flag`` for booleans; one or more
    values for a ``tuple[str, ...]``). Options default to None, so :func:`from_sources` can
    tell given from not given."""
    from launch.cli import OneLineParser

    parser = OneLineParser(prog=prog, description=description)
    where = f" ({config_dir})" if config_dir else ""
    parser.add_argument("--config", type=Path, help=f"YAML file with any of the settings below{where}")
    hints = typing.get_type_hints(cls)
    helps: dict[str, str] = getattr(cls, "HELP", {})
    for f in dataclasses.fields(cls):
        if f.name != OPTIMIZER_FIELD:
            _add_option(parser, f.name, hints[f.name], helps.get(f.name), f.default)
    nested = optimizer_options(cls)
    if nested:
        options = parser.add_argument_group(
            "BregTop settings", f"the fields of bregtop_dist.BregTopConfig; in YAML under {OPTIMIZER_FIELD}:")
        kinds, docs = typing.get_type_hints(BregTopConfig), field_docs(BregTopConfig)
        for name in nested:
            _add_option(options, name, kinds[name], docs.get(name), BregTopConfig.__dataclass_fields__[name].default)
    return parser


def _add_option(parser: Any, name: str, kind: Any, text: str | None, default: Any) -> None:
    """``--name`` (``--name/--no-name`` for a bool, ``--name A B`` for a ``tuple[str, ...]``,
    repeatable), defaulting to None so that given and not given can be told apart."""
    flag = "--" + name.replace("_", "-")
    words = typing.get_args(kind) == (str, Ellipsis)
    shown = (" " if words else ",").join(map(str, default)) or "none" if isinstance(default, tuple) else default
    text = f"{text} (default {shown})" if text else f"(default {shown})"
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    elif words:
        parser.add_argument(flag, nargs="+", action="extend", default=None, metavar=name.upper().rstrip("S"), help=text)
    else:
        parser.add_argument(flag, type=kind if kind in (int, float) else str, default=None, help=text)


def parse_list(text: str, name: str, cast: type = int, minimum: float | None = None) -> tuple[Any, ...]:
    """The comma-separated values of a setting such as ``checkpoints="100,1000"``, each at least
    ``minimum`` when given; an error names the setting and what it must hold."""
    try:
        values = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r} must be comma-separated {cast.__name__} values") from None
    if not values:
        raise ValueError(f"{name}={text!r} must list at least one {cast.__name__} value")
    if minimum is not None and min(values) < minimum:
        raise ValueError(f"{name}={text!r} must list {'integers' if cast is int else cast.__name__ + ' values'} >= {minimum}")
    return values


def check_positive(config: Any, names: tuple[str, ...]) -> None:
    """ValueError naming the first of the integer settings ``names`` of ``config`` that is set
    (not None) and below 1."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """The settings of a job that trains with BregTop (``launch.lm``, ``launch.sst2``): what
    both take, their shared help texts (``HELP``; each job adds its own) and checks. A job's
    dataclass derives from it and gives ``max_steps``, ``batch_size`` and ``out`` their defaults
    (and redeclares any other default it differs in); ``POSITIVE`` names its integer settings that must be
    >= 1. The settings BregTop itself takes are the nested record ``optimizer``."""

    HELP: ClassVar[dict[str, str]] = {
        "seed": "seed of the model's initialisation and of the data order",
        "dataset": "a Hub dataset name instead of the local files (needs a network)",
        "cpu": "run on the CPU even where a GPU is present (for torchrun on a CPU machine)",
        "deepspeed": "a DeepSpeed JSON (configs/deepspeed/) whose optimizer block selects BregTop",
        "split_qkv": "precondition fused q/k/v projections as three Kronecker matrices, as the paper does "
                     "(param_groups' default); off by default here because the published tables were measured whole",
    }
    OPTIMIZER_OWN: ClassVar[tuple[str, ...]] = ("method", "bregtop")
    POSITIVE: ClassVar[tuple[str, ...]] = ("max_steps", "batch_size")

    method: str = BregTopConfig.method  # adamw or a BregTop method (a job may take several)
    max_steps: int
    batch_size: int
    optimizer: BregTopConfig = BregTopConfig()  # BregTop's settings (and adamw's lr, betas, eps, decay)
    seed: int = 0
    out: Path
    cache_dir: Path = Path("runs/cache")
    dataset: str | None = None
    resume: bool = False
    cpu: bool = False
    deepspeed: Path | None = None
    split_qkv: bool = False

    def __post_init__(self) -> None:
        for name in self.methods:
            if name not in (*METHODS, "adamw"):
                raise ValueError(f"method={name!r} is not allowed; use adamw or one of {', '.join(METHODS)}")
        check_positive(self, self.POSITIVE)
        if not self.lr > 0.0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        own = [n for n in ("method", "exponent") if n in self.OPTIMIZER_OWN
               and getattr(self.optimizer, n) != getattr(BregTopConfig, n)]
        if own:
            raise ValueError(f"optimizer.{own[0]} is the job's: set {own[0]} at the top level")
        if "adamw" in self.methods and self.deepspeed is not None:
            raise ValueError("--deepspeed configs select BregTop; run adamw without --deepspeed")
        for method in self.methods:  # BregTop's own checks of each row, before any runs
            self.row_config(method)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods the job runs (one, unless a job takes several)."""
        return (self.method,)

    @property
    def lr(self) -> float:
        """The peak learning rate (BregTop's ``lr``, also adamw's)."""
        return self.optimizer.lr

    def row_config(self, method: str | None = None) -> BregTopConfig:
        """The settings of a row: BregTop's with ``method`` (default: the job's); for ``adamw``
        the record as it is (AdamW takes its lr and AdamW-side settings)."""
        method = method or self.method
        return self.optimizer if method == "adamw" else dataclasses.replace(self.optimizer, method=method)
