"""The LM job's checkpoints against a person who can write the checkpoint folder, and against
accidents: nothing in a file runs, a changed manifest or data file is refused in one line
naming it, and ``--resume`` refuses settings that differ from the checkpoint's.

An attacker can rewrite ``complete.json``'s hashes (and its own hash), so every test that
plants something reseals the manifest the way an attacker would (:func:`_reseal`): the
loaders must refuse on their own. A payload that runs code fails its test by the file it
leaves behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoints import _stack_global_call
from test_launch_jobs import ROOT, TINY_LM
from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

from launch import checkpoints, dcp_reading, lm
from launch.checkpoints import MARKER, SEAL, CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class _Touch:
    """Unpickling this runs ``touch path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _legacy_torch_file(pickled: bytes) -> bytes:
    """``pickled`` as the object of a torch.save file in torch's legacy (non-zip) format, which
    ``torch.load`` still reads: how to hand its loader a hand-made pickle."""
    info = dict(protocol_version=PROTOCOL_VERSION, little_endian=sys.byteorder == "little",
                type_sizes=dict(short=2, int=4, long=4))
    head = b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, info))
    return head + pickled + pickle.dumps([], protocol=2)


def _reseal(folder: Path) -> None:
    """What an attacker who can write the folder does after changing it: record every file's
    hash again and the manifest's own hash."""
    marker = json.loads((folder / MARKER).read_text())
    marker.pop(SEAL)
    marker["files"] = {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest() for rel in marker["files"]}
    (folder / MARKER).write_text(json.dumps(checkpoints.seal(marker), indent=1) + "\n")


def _metadata(folder: Path):
    with (folder / ".metadata").open("rb") as f:
        return pickle.load(f)  # the test's own file: trusted here


def _point_item_at(folder: Path, fqn: str, data: bytes) -> None:
    """Append ``data`` to the item's data file and point the item's storage record at it."""
    meta = _metadata(folder)
    index = next(k for k in meta.storage_data if k.fqn == fqn)
    info = meta.storage_data[index]
    target = folder / info.relative_path
    offset = target.stat().st_size
    with target.open("ab") as f:
        f.write(data)
    meta.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(data))
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    _reseal(folder)


# ------------------------------------------------------------------ one saved run, copied per test
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 2-step bregtop-vn-v2 LM run with a checkpoint at step 2, and its command line."""
    base = tmp_path_factory.mktemp("saved")
    text = base / "text.txt"
    text.write_text((ROOT / "data/lm/tinyshakespeare/input.txt").read_text()[:20000])
    common = [*TINY_LM, "--data", str(text), "--cache-dir", str(base / "cache"), "--ckpt-every", "2",
              "--method", "bregtop-vn-v2"]
    assert lm.main([*common, "--max-steps", "2", "--out", str(base / "run")]) == 0
    return base / "run", common


@pytest.fixture
def run(saved, tmp_path) -> tuple[Path, Path, list[str]]:
    """A copy of the saved run: (its output folder, its checkpoint folder, the command line)."""
    src, common = saved
    out = tmp_path / "run"
    shutil.copytree(src, out)
    return out, checkpoints.step_dir(out / "ckpt", 2), common


def _resume_error(out: Path, common: list[str], capsys, *extra: str) -> str:
    capsys.readouterr()
    assert lm.main([*common, "--max-steps", "4", "--out", str(out), "--resume", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


# ------------------------------------------------------------------ no pickle runs code
def test_code_in_a_dcp_byte_item_does_not_run_on_resume(run, capsys, tmp_path):
    out, folder, common = run
    live, planted = tmp_path / "live", tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(_Touch(live), payload)
    torch.load(io.BytesIO(payload.getvalue()), weights_only=False)  # DCP's own loader for byte items
    assert live.exists()  # the payload is live
    payload = io.BytesIO()
    torch.save(_Touch(planted), payload)
    _point_item_at(folder, "optim.param_groups.0.lr", payload.getvalue())
    err = _resume_error(out, common, capsys)
    assert "item 'optim.param_groups.0.lr' is refused" in err and "posix.system" in err, err
    assert not planted.exists()


@pytest.mark.parametrize("module,name", [
    ("torch.distributed.checkpoint.metadata", "os.system"),
    ("torch", "os.system"),
    ("builtins", "exec"),
    ("functools", "partial"),
    ("copyreg", "_reconstructor"),
    ("operator", "attrgetter"),
    ("posix", "system"),
])
def test_gadgets_in_a_byte_item_run_nothing(tmp_path, module, name):
    planted = tmp_path / "pwned"
    data = io.BytesIO(_legacy_torch_file(_stack_global_call(module, name, f"touch {planted}")))
    with pytest.raises(CheckpointError, match=r"^item 'x' is refused: .*"):
        dcp_reading.load_plain(data, "x")
    assert not planted.exists()


def test_a_byte_item_that_is_not_plain_data_is_refused(tmp_path):
    data = io.BytesIO()
    torch.save({"lr": torch.ones(2)}, data)
    data.seek(0)
    with pytest.raises(CheckpointError, match=r"item 'lr' is refused: it holds a dict; only numbers"):
        dcp_reading.load_plain(data, "lr")
    data = io.BytesIO()
    torch.save({"betas": (0.9, [0.99, None]), "method": "kl", 3: True}, data)
    data.seek(0)
    assert dcp_reading.load_plain(data, "group") == {"betas": (0.9, [0.99, None]), "method": "kl", 3: True}


@pytest.mark.parametrize("where", ["../outside.distcp", "/etc/hostname", "sub/__0_0.distcp", ".."])
def test_metadata_pointing_outside_the_folder_is_refused(run, capsys, where):
    out, folder, common = run
    meta = _metadata(folder)
    index = next(iter(meta.storage_data))
    meta.storage_data[index] = dataclasses.replace(meta.storage_data[index], relative_path=where)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    _reseal(folder)
    err = _resume_error(out, common, capsys)
    assert f"is stored in {where!r}, which is not a file name inside the checkpoint's folder" in err, err


# ------------------------------------------------------------------ DCP's failures in one line
@pytest.mark.parametrize("damage", ["truncate", "delete", "garble"])
def test_a_damaged_data_file_with_a_rewritten_manifest_gives_one_line(run, capsys, damage):
    out, folder, common = run
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    raw = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(raw[: len(raw) // 2])
    elif damage == "delete":
        shard.unlink()
        marker = json.loads((folder / MARKER).read_text())
        del marker["files"][shard.name]
        marker.pop(SEAL)
        (folder / MARKER).write_text(json.dumps(checkpoints.seal(marker)))
    else:  # the bytes of a tensor item, overwritten where its storage record points
        meta = _metadata(folder)
        info = next(v for k, v in meta.storage_data.items() if k.fqn == "model.wte.weight")
        shard.write_bytes(raw[:info.offset] + b"\0" * info.length + raw[info.offset + info.length:])
    if damage != "delete":
        _reseal(folder)
    err = _resume_error(out, common, capsys)
    assert str(shard) in err, err


# ------------------------------------------------------------------ the manifest
def test_every_single_bit_flip_of_a_real_manifest_is_refused_or_changes_nothing(run):
    _, folder, _ = run
    path = folder / MARKER
    good = path.read_bytes()
    want = checkpoints.read_manifest(folder)
    accepted = 0
    for byte in range(len(good)):
        for bit in range(8):
            flipped = bytearray(good)
            flipped[byte] ^= 1 << bit
            path.write_bytes(bytes(flipped))
            try:
                got = checkpoints.read_manifest(folder)
            except CheckpointError as err:
                assert str(path) in str(err) and "\n" not in str(err)
                continue
            assert got == want, (byte, bit)
            accepted += 1
    path.write_bytes(good)
    assert accepted < len(good)  # whitespace-like flips JSON reads the same; nearly all are refused


@pytest.mark.parametrize("change", ["step", "lr", "outside", "absolute", "nested"])
def test_a_resealed_manifest_naming_what_it_must_not_is_refused(run, capsys, change):
    out, folder, common = run
    marker = json.loads((folder / MARKER).read_text())
    marker.pop(SEAL)
    if change == "step":
        marker["step"] = 3
    elif change == "lr":
        marker["scheduler"]["_last_lr"] = [1.001 for _ in marker["scheduler"]["_last_lr"]]
    elif change == "outside":
        marker["files"]["../ckpt/x"] = "0" * 64
    elif change == "absolute":
        marker["files"]["/etc/hostname"] = "0" * 64
    else:
        marker["files"]["sub/complete.json"] = "0" * 64
    (folder / MARKER).write_text(json.dumps(checkpoints.seal(marker)))
    err = _resume_error(out, common, capsys)
    expected = {
        "step": "step 3 is not the folder's 2",
        "lr": "the scheduler state it records is not the schedule's at step 2",
        "outside": "it names '../ckpt/x', which is not a file inside its folder",
        "absolute": "it names '/etc/hostname', which is not a file inside its folder",
        "nested": "it names 'sub/complete.json', which is not a file inside its folder",
    }[change]
    assert expected in err and str(folder / MARKER) in err, err


def test_a_manifest_below_the_top_and_symbolic_links_are_refused(run, capsys):
    out, folder, common = run
    (folder / "sub").mkdir()
    shutil.copy(folder / MARKER, folder / "sub" / MARKER)
    err = _resume_error(out, common, capsys)
    assert f"{str(folder / 'sub' / MARKER)!r} is in the checkpoint but was not written with it" in err, err
    shutil.rmtree(folder / "sub")
    (folder / "link").symlink_to("/etc/hostname")
    err = _resume_error(out, common, capsys)
    assert f"{str(folder / 'link')!r} is a symbolic link" in err, err


def test_a_manifest_of_the_wrong_type_is_refused_in_one_line(run, capsys):
    out, folder, common = run
    for raw in (b"[]", b'{"step": "2", "files": {}}', b"{", b'{"step": 2, "files": {}, "x": "\xff"}',
                b'{"step": 2, "files": {}, "x": NaN}'):
        (folder / MARKER).write_bytes(raw)
        err = _resume_error(out, common, capsys)
        assert str(folder / MARKER) in err and "is damaged or was changed" in err, err


# ------------------------------------------------------------------ --resume and the settings
@pytest.mark.parametrize("flag,value,then", [
    ("--method", "kl", "bregtop-vn-v2"),
    ("--weight-decay", "0.1", "0.0"),
    ("--max-precond-dim", "64", "1024"),
    ("--seed", "1", "0"),
])
def test_resume_refuses_settings_that_differ_from_the_checkpoint(run, capsys, flag, value, then):
    out, _, common = run
    before = sorted(p.name for p in (out / "ckpt").iterdir())
    err = _resume_error(out, common, capsys, flag, value)
    name = flag[2:].replace("-", "_")
    assert f"--resume: {name}={value} differs from the checkpoint's {then}" in err, err
    assert f"pass {flag} {then}" in err
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == before  # nothing written


def test_resume_applies_the_settings_that_may_change(run):
    out, _, common = run
    assert lm.main([*common, "--max-steps", "4", "--out", str(out), "--resume", "--rotation-precision", "bf16"]) == 0
    folder = checkpoints.step_dir(out / "ckpt", 4)
    meta = dcp_reading.check_dcp_metadata(folder)
    for group in (0, 1):
        info = next(v for k, v in meta.storage_data.items() if k.fqn == f"optim.param_groups.{group}.rotation_precision")
        with (folder / info.relative_path).open("rb") as f:
            f.seek(info.offset)
            assert dcp_reading.load_plain(io.BytesIO(f.read(info.length)), "rp") == "bf16"
    assert checkpoints.read_manifest(folder)["config"]["optimizer"]["rotation_precision"] == "bf16"


# ------------------------------------------------------------------ two processes: every rank alike, no hang
def _torchrun_rc(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "launch.lm",
         "--cpu", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,  # fails, never hangs
    )


def _item_tensor(folder: Path, fqn: str) -> torch.Tensor:
    info = next(v for k, v in _metadata(folder).storage_data.items() if k.fqn == fqn)
    with (folder / info.relative_path).open("rb") as f:
        f.seek(info.offset)
        return torch.load(io.BytesIO(f.read(info.length)), weights_only=True)


@pytest.mark.parametrize("fqn,expected", [
    ("optim.state.blocks.0.attn.qkv.weight.kron.0.L", "of blocks.0.attn.qkv.weight"),  # read by its owner only
    ("model.blocks.0.mlp.0.weight", "model weight 'blocks.0.mlp.0.weight' holds NaN or inf"),
])
def test_a_poisoned_tensor_is_refused_alike_on_both_ranks_under_torchrun(saved, tmp_path, fqn, expected):
    _, common = saved
    out = tmp_path / "run"
    done = _torchrun_rc([*common, "--max-steps", "2", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    folder = checkpoints.step_dir(out / "ckpt", 2)
    poisoned = _item_tensor(folder, fqn).clone()
    poisoned.view(-1)[poisoned.numel() // 2] = float("nan")
    data = io.BytesIO()
    torch.save(poisoned, data)
    _point_item_at(folder, fqn, data.getvalue())
    done = _torchrun_rc([*common, "--max-steps", "4", "--out", str(out), "--resume"])
    assert done.returncode != 0
    # the two ranks write to one stderr, and their lines may run together: split on the prefix
    errors = [chunk.splitlines()[0].strip() for chunk in done.stderr.split("python -m launch.lm: error:")[1:]]
    assert len(errors) == 2 and errors[0] == errors[1], done.stderr[-3000:]
    assert expected in errors[0] and str(folder) in errors[0], errors[0]
    if ".kron." in fqn:
        assert "field 'L'" in errors[0] and "must be finite" in errors[0], errors[0]
    assert checkpoints.complete_steps(out / "ckpt") == [2]  # nothing trained or written
