"""Reading a torch.distributed.checkpoint folder so that nothing in it runs and a damaged file
is refused in one line naming it.

DCP unpickles two things without restriction: the ``.metadata`` file (``pickle.load``) and
every non-tensor item of the state dict (``torch.load(weights_only=False)``: the optimizer's
``param_groups`` entries). :class:`SafeReader` reads the metadata through an unpickler that
knows DCP's metadata classes by exact (module, name) and nothing else, and checks that every
storage record names a file of the folder and a byte range inside it; :class:`SafePlanner`
reads the non-tensor items with torch's ``weights_only=True`` loader and accepts plain data
only (numbers, strings, bools, None, and lists, tuples and dicts of them). Tensors DCP already
reads with ``weights_only=True``.

Anything that goes wrong while DCP reads becomes a :class:`CheckpointError` with one line
naming the file (:func:`load`): DCP's own error gathers every rank's traceback.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from bregtop_dist.integrations.deepspeed_files import why_refused
from launch.checkpoints import CheckpointError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}
"""The exact (module, name) pairs DCP's ``.metadata`` pickle uses (and torch's dtypes). A name
is looked up in its module only: a dotted name (pickle protocol 4 would follow it through
attributes, ``torch.distributed.checkpoint.metadata`` ``os.system``) is refused."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = "." not in name and (
            (module, name) in _ALLOWED
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")
        return super().find_class(module, name)


def read_metadata(path: Path) -> Metadata:
    """DCP's ``.metadata`` file at ``path``, unpickled with DCP's metadata classes only."""
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is missing: not a torch.distributed.checkpoint folder") from None
    except Exception as err:  # noqa: BLE001 - any failure to read it is a refusal
        raise CheckpointError(f"{str(path)!r} is refused: {err}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{str(path)!r} is refused: it holds a {type(metadata).__name__}, not DCP's Metadata "
                              "with its storage records")
    return metadata


def check_dcp_metadata(folder: Path) -> Metadata:
    """The metadata of the DCP checkpoint in ``folder``, refused unless it holds DCP's metadata
    classes only and every storage record names a byte range of a file in the folder."""
    path = folder / ".metadata"
    metadata = read_metadata(path)
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        what = getattr(index, "fqn", index)
        rel, offset, length = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        if not (isinstance(rel, str) and rel and rel == os.path.basename(rel) and rel not in (".", "..")):
            raise CheckpointError(f"{str(path)!r} is refused: item {what!r} is stored in {rel!r}, which is not a "
                                  "file name inside the checkpoint's folder")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{str(path)!r} is refused: item {what!r} asks for stream transforms "
                                  f"{info.transform_descriptors!r}; these checkpoints are written without any")
        if rel not in sizes:
            file = folder / rel
            if file.is_symlink() or not file.is_file():
                raise CheckpointError(f"{str(file)!r} is missing (named by {str(path)!r} for item {what!r})")
            sizes[rel] = file.stat().st_size
        if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0
                and offset + length <= sizes[rel]):
            raise CheckpointError(f"{str(folder / rel)!r} is too short or the metadata is damaged: item {what!r} "
                                  f"is recorded at bytes {offset!r}+{length!r} of a {sizes[rel]}-byte file")
    return metadata


def _is_plain(value: Any, depth: int = 0) -> bool:
    """Numbers (finite or not: the caller validates), strings, bools, None, and lists, tuples
    and dicts (with str or int keys) of them: what a ``param_groups`` entry holds."""
    if depth > 8:
        return False
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) in (list, tuple):
        return all(_is_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) in (str, int) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def load_plain(data: io.BytesIO, what: str) -> Any:
    """A non-tensor item DCP stored (``torch.save`` of a Python value), loaded with torch's
    ``weights_only`` loader and accepted only as plain data."""
    try:
        value = torch.load(data, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure is a refusal
        raise CheckpointError(f"item {what!r} is refused: {why_refused(err)}") from None
    if not _is_plain(value):
        raise CheckpointError(f"item {what!r} is refused: it holds a {type(value).__name__}; only numbers, strings, "
                              "bools, None and lists, tuples and dicts of them are read from a checkpoint")
    return value


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor items with :func:`load_plain`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = load_plain(value, fqn)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # what the default planner does

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeReader(FileSystemReader):
    """DCP's file-system reader with the metadata read by :func:`check_dcp_metadata` and every
    failure while reading a data file raised as a :class:`CheckpointError` naming it."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback after a failed read: only the global file is read
            raise CheckpointError(f"{str(Path(self.path) / '.metadata')!r} could not be read")
        metadata = check_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        future = None
        for rel, items in per_file.items():
            try:
                future = super().read_data(dataclasses.replace(plan, items=items), planner)
            except CheckpointError:
                raise
            except Exception as err:  # noqa: BLE001 - one line naming the file
                text = str(err).strip().splitlines()
                raise CheckpointError(f"{str(Path(self.path) / rel)!r} could not be read ({type(err).__name__}: "
                                      f"{text[0] if text else 'no detail'}); delete the checkpoint folder to resume "
                                      "from the one before it") from None
        if future is None:
            future = super().read_data(plan, planner)
        return future


def _first_failure(err: BaseException) -> BaseException:
    """The error of the lowest failing rank inside DCP's CheckpointException (or ``err``)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = failures[min(failures)]
        return wrapped[0] if isinstance(wrapped, tuple) else wrapped
    return err


def load(state: dict[str, Any], folder: Path) -> None:
    """``dcp.load(state, folder)`` with :class:`SafeReader` and :class:`SafePlanner`; any
    failure becomes one :class:`CheckpointError` line (collective, like ``dcp.load``)."""
    from torch.distributed.checkpoint.api import CheckpointException

    check_dcp_metadata(folder)  # before DCP: it prints the traceback of a failed metadata read
    try:
        dcp.load(state, storage_reader=SafeReader(folder), planner=SafePlanner())
    except CheckpointException as err:
        first = _first_failure(err)
        if isinstance(first, CheckpointError):
            raise CheckpointError(str(first)) from None
        lines = str(first).strip().splitlines()
        raise CheckpointError(f"{str(folder)!r} could not be loaded ({type(first).__name__}: "
                              f"{lines[0] if lines else 'no detail'})") from None


def refuse_non_finite(state: dict[str, Any], folder: Path, what: str) -> None:
    """Refuse, on every rank alike, a loaded state whose tensors hold NaN or inf (each rank
    checks its own part of DTensors), naming the first such entry. Collective under a
    process group."""
    import torch.distributed as dist

    bad = None
    for name, value in state.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        if isinstance(local, torch.Tensor) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad = name
            break
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        found: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
        bad = next((b for b in found if b is not None), None)
    if bad is not None:
        raise CheckpointError(f"{str(folder)!r}: {what} {bad!r} holds NaN or inf; nothing was loaded into the "
                              "optimizer (delete the folder to resume from the checkpoint before it)")

