"""The jobs' checkpoints: written so that a crash never leaves a run unable to resume, read so
that a damaged or crafted file is refused with one line naming it.

Each checkpoint is a folder ``step-<N>`` under the run's ``ckpt/``. It is written as
``.tmp-step-<N>`` (every rank writes its part), then rank 0 fsyncs the files, records their
SHA-256 in ``complete.json`` (written to a temporary name, fsynced, renamed), and renames the
folder into place: a folder named ``step-<N>`` with a ``complete.json`` is complete. The two
newest complete checkpoints are kept. Resuming takes the newest complete one and checks every
file against its recorded hash before anything reads it.

Model and optimizer go through torch.distributed.checkpoint, so a run resumes at another
process count; :mod:`launch.dcp_reading` reads it without running anything from the files.
(DeepSpeed runs use the engine's own checkpoint inside the folder, loadable at the same
process count only.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "complete.json"
KEEP = 2
FORMAT = 2
"""The manifest's format: 2 carries ``format`` and its own hash (``SEAL``); 1 (no ``format``
key, written before) carries neither and is read with the same type checks."""
SEAL = "manifest_sha256"
RESERVED = ("format", "step", "files", SEAL)
_HEX = frozenset("0123456789abcdef")


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
    """Every file under ``folder`` but its own manifest (a manifest further down is listed:
    nothing writes one there). Refuses symbolic links: a checkpoint holds plain files only."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            if path.is_symlink():
                raise CheckpointError(f"{str(path)!r} is a symbolic link; a checkpoint holds plain files only")
        out += [Path(dirpath, name) for name in filenames]
    return sorted(p for p in out if p != folder / MARKER)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save(root: Path, step: int, write: Callable[[Path], None], info: dict[str, Any], is_main: bool,
         barrier: Callable[[], None]) -> Path:
    """Write checkpoint ``step`` under ``root``: ``write(folder)`` runs on every rank (each
    writes its part), then rank 0 seals it. Collective: call on every rank."""
    clash = set(RESERVED) & set(info)
    if clash:
        raise ValueError(f"info may not set the manifest's own keys {sorted(clash)}")
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
        marker = seal({"format": FORMAT, "step": step,
                       "files": {f.relative_to(tmp).as_posix(): _sha256(f) for f in files}, **info})
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


def _canonical(content: dict[str, Any]) -> bytes:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def seal(content: dict[str, Any]) -> dict[str, Any]:
    """``content`` with its own SHA-256 (of its canonical JSON) added under ``SEAL``."""
    return {**content, SEAL: hashlib.sha256(_canonical(content)).hexdigest()}


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a manifest holds")


def _manifest_problem(marker: Any, step: int) -> str | None:
    """What is wrong with a parsed manifest of checkpoint ``step``, or None."""
    if not isinstance(marker, dict):
        return f"it holds a {type(marker).__name__}, not an object"
    sealed = "format" in marker or SEAL in marker
    if sealed:
        if marker.get("format") != FORMAT or type(marker.get("format")) is not int:
            return f"format {marker.get('format')!r} is not {FORMAT}"
        content = {k: v for k, v in marker.items() if k != SEAL}
        if not _is_digest(marker.get(SEAL)) or hashlib.sha256(_canonical(content)).hexdigest() != marker[SEAL]:
            return "its content does not match its own hash"
    if type(marker.get("step")) is not int or marker["step"] != step:
        return f"step {marker.get('step')!r} is not the folder's {step}"
    files = marker.get("files")
    if not isinstance(files, dict):
        return "'files' is not an object"
    for rel, digest in files.items():
        parts = rel.split("/")
        if (not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts)
                or MARKER in parts):
            return f"it names {rel!r}, which is not a file inside its folder"
        if not _is_digest(digest):
            return f"the hash of {rel!r} is not a SHA-256 digest"
    return None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``folder``, refused in one line if its bytes, its own hash,
    its types or the files it names are wrong (nothing else is read first)."""
    path = folder / MARKER
    step = int(folder.name[5:])
    try:
        marker = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
        why = _manifest_problem(marker, step)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        why = f"it is not valid JSON ({type(err).__name__})"
    if why is not None:
        raise CheckpointError(f"{str(path)!r} is damaged or was changed: {why}; delete {str(folder)!r} to resume "
                              "from the checkpoint before it")
    return marker


def latest(root: Path) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint under ``root`` and its manifest (checked by
    :func:`read_manifest`), every file checked against it and no file more."""
    steps = complete_steps(root)
    if not steps:
        raise CheckpointError(f"no complete checkpoint under {str(root)!r} (run without --resume first)")
    folder = step_dir(root, steps[-1])
    if folder.is_symlink():
        raise CheckpointError(f"{str(folder)!r} is a symbolic link; a checkpoint holds plain files only")
    marker = read_manifest(folder)
    recorded = marker["files"]
    present = _files(folder)
    for rel, digest in recorded.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} is missing from the checkpoint")
        if _sha256(path) != digest:
            raise CheckpointError(f"{str(path)!r} does not match the hash recorded when it was written (damaged or "
                                  f"changed); delete {str(folder)!r} to resume from the checkpoint before it")
    extra = [str(p) for p in present if p.relative_to(folder).as_posix() not in recorded]
    if extra:
        raise CheckpointError(f"{extra[0]!r} is in the checkpoint but was not written with it")
    return folder, marker
