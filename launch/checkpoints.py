"""The jobs' checkpoints: written so that a crash never leaves a run unable to resume, read so
that a damaged or crafted file is refused with one line naming it.

Each checkpoint is a folder ``step-<N>`` under the run's ``ckpt/``. It is written as
``.tmp-step-<N>`` (every rank writes its part), then rank 0 fsyncs the files, records their
SHA-256 in ``complete.json`` (written to a temporary name, fsynced, renamed), and renames the
folder into place: a folder named ``step-<N>`` with a ``complete.json`` is complete. The two
newest complete checkpoints are kept. Resuming takes the newest complete one and checks every
file against its recorded hash before anything reads it.

Model and optimizer go through torch.distributed.checkpoint, so a run resumes at another
process count; its ``.metadata`` file is a pickle, which is read only after a restricted
unpickler has found nothing in it but DCP's own metadata classes. (DeepSpeed runs use the
engine's own checkpoint inside the folder, loadable at the same process count only.)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "complete.json"
KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save(root: Path, step: int, write: Callable[[Path], None], info: dict[str, Any], is_main: bool,
         barrier: Callable[[], None]) -> Path:
    """Write checkpoint ``step`` under ``root``: ``write(folder)`` runs on every rank (each
    writes its part), then rank 0 seals it. Collective: call on every rank."""
    tmp = root / f".tmp-step-{step:08d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    barrier()
    final = step_dir(root, step)
    if is_main:
        files = _files(tmp)
        for f in files:
            _fsync_file(f)
        marker = {"step": step, "files": {str(f.relative_to(tmp)): _sha256(f) for f in files}, **info}
        part = tmp / (MARKER + ".part")
        part.write_text(json.dumps(marker, indent=1) + "\n")
        _fsync_file(part)
        part.rename(tmp / MARKER)
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
        for old in complete_steps(root)[:-KEEP]:
            shutil.rmtree(step_dir(root, old), ignore_errors=True)
    barrier()
    return final


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    steps = []
    for d in root.glob("step-*"):
        if d.is_dir() and (d / MARKER).is_file() and d.name[5:].isdigit():
            steps.append(int(d.name[5:]))
    return sorted(steps)


def latest(root: Path) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint under ``root`` and its marker, every file checked."""
    steps = complete_steps(root)
    if not steps:
        raise CheckpointError(f"no complete checkpoint under {str(root)!r} (run without --resume first)")
    folder = step_dir(root, steps[-1])
    try:
        marker = json.loads((folder / MARKER).read_text())
        recorded = dict(marker["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{str(folder / MARKER)!r} is damaged ({type(err).__name__}); delete {str(folder)!r} "
                              "to resume from the checkpoint before it") from None
    for rel, digest in recorded.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} is missing from the checkpoint")
        if _sha256(path) != digest:
            raise CheckpointError(f"{str(path)!r} does not match the hash recorded when it was written (damaged or "
                                  f"changed); delete {str(folder)!r} to resume from the checkpoint before it")
    extra = [str(p) for p in _files(folder) if str(p.relative_to(folder)) not in recorded]
    if extra:
        raise CheckpointError(f"{extra[0]!r} is in the checkpoint but was not written with it")
    return folder, marker


# ------------------------------------------------------------------ DCP's pickled metadata
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
        import torch

        allowed = "." not in name and (
            (module, name) in _ALLOWED
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")
        return super().find_class(module, name)


def check_dcp_metadata(folder: Path) -> None:
    """Refuse a DCP checkpoint whose ``.metadata`` pickle names anything but DCP's metadata
    classes (DCP itself unpickles it without restriction)."""
    path = folder / ".metadata"
    try:
        with path.open("rb") as f:
            _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is missing: not a torch.distributed.checkpoint folder") from None
    except Exception as err:  # noqa: BLE001 - any failure to read it is a refusal
        raise CheckpointError(f"{str(path)!r} is refused: {err}") from None
