"""The jobs' checkpoints (launch/checkpoints.py and the LM job): a crash while writing leaves
the previous checkpoint to resume from, damaged or crafted files are refused in one line
naming them, and a run saved by 2 processes resumes on 1."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from test_launch_jobs import ROOT, TINY_LM, _rows, _torchrun

from launch import checkpoints, dcp_reading, lm
from launch.checkpoints import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _noop() -> None:
    pass


def _write_files(contents: dict[str, bytes]):
    def write(folder: Path) -> None:
        for name, data in contents.items():
            (folder / name).write_bytes(data)
    return write


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, gen):
    payload = os.urandom(64)
    checkpoints.save(tmp_path, 2, _write_files({"a.bin": payload}), {"note": 1}, True, _noop)

    def crash(folder: Path) -> None:
        (folder / "a.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # the process dies here: no marker, the folder is never renamed

    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(tmp_path, 4, crash, {}, True, _noop)
    folder, marker = checkpoints.latest(tmp_path)
    assert folder.name == "step-00000002" and marker["step"] == 2 and marker["note"] == 1
    assert (folder / "a.bin").read_bytes() == payload
    (tmp_path / "step-00000006").mkdir()  # a folder without its marker (a copy cut short)
    assert checkpoints.latest(tmp_path)[0].name == "step-00000002"


def test_only_the_two_newest_complete_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoints.save(tmp_path, step, _write_files({"x": bytes([step])}), {}, True, _noop)
    assert checkpoints.complete_steps(tmp_path) == [3, 4]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "add"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, gen, damage):
    data = os.urandom(256)
    checkpoints.save(tmp_path, 3, _write_files({"model.bin": data, "other.bin": b"x"}), {}, True, _noop)
    target = tmp_path / "step-00000003" / "model.bin"
    if damage == "flip":
        raw = bytearray(data)
        for i in torch.randint(0, len(raw), (16,), generator=gen).tolist():
            raw[i] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(data[:100])
    elif damage == "delete":
        target.unlink()
    else:
        target = target.with_name("injected.bin")
        target.write_bytes(b"y")
    with pytest.raises(CheckpointError) as err:
        checkpoints.latest(tmp_path)
    assert str(target) in str(err.value) and "\n" not in str(err.value)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _stack_global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle that calls ``module``'s ``name`` (a dotted name is followed through
    attributes by pickle's own find_class) with one string argument."""
    def text(s: str) -> bytes:
        raw = s.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw

    return (pickle.PROTO + b"\x04" + text(module) + pickle.MEMOIZE + text(name) + pickle.MEMOIZE
            + pickle.STACK_GLOBAL + text(arg) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


@pytest.mark.parametrize("module,name", [
    ("torch.distributed.checkpoint.metadata", "os.system"),  # reaches os through the allowed module
    ("torch", "os.system"),
    ("torch.distributed.checkpoint.metadata", "__builtins__.get"),
    ("torch.distributed.checkpoint.metadata", "dataclasses.sys.modules.get"),
    ("builtins", "getattr"),
    ("functools", "partial"),
    ("torch._utils", "_rebuild_tensor"),
    ("copyreg", "_reconstructor"),
    ("operator", "attrgetter"),
])
def test_dotted_names_and_gadgets_in_dcp_metadata_run_nothing(tmp_path, module, name):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(_stack_global_call(module, name, f"touch {marker}"))
    with pytest.raises(CheckpointError, match=r"\.metadata' is refused: .* is not allowed"):
        dcp_reading.check_dcp_metadata(tmp_path)
    assert not marker.exists()


def test_crafted_dcp_metadata_is_refused_before_anything_runs(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match=r"\.metadata' is refused: posix\.system is not allowed"):
        dcp_reading.check_dcp_metadata(tmp_path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


# ---------------------------------------------------------------------------------- LM job
@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text((ROOT / "data/lm/tinyshakespeare/input.txt").read_text()[:20000])
    return path


def test_lm_resumes_from_the_last_complete_checkpoint_and_refuses_a_damaged_one(tmp_path, text, capsys):
    common = [*TINY_LM, "--data", str(text), "--cache-dir", str(tmp_path / "cache"), "--ckpt-every", "2"]
    assert lm.main([*common, "--max-steps", "4", "--out", str(tmp_path / "b")]) == 0
    assert lm.main([*common, "--max-steps", "2", "--out", str(tmp_path / "a")]) == 0
    (tmp_path / "a/ckpt/.tmp-step-00000003").mkdir()  # killed while writing step 3
    (tmp_path / "a/ckpt/.tmp-step-00000003/__0_0.distcp").write_bytes(b"")
    assert lm.main([*common, "--max-steps", "4", "--out", str(tmp_path / "a"), "--resume"]) == 0
    resumed, straight = _rows(tmp_path / "a/metrics.jsonl"), _rows(tmp_path / "b/metrics.jsonl")
    assert resumed[-1]["train_loss"] == straight[-1]["train_loss"]

    newest = tmp_path / "a/ckpt/step-00000004"
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    capsys.readouterr()
    assert lm.main([*common, "--max-steps", "6", "--out", str(tmp_path / "a"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(shard) in err and "does not match the hash" in err and "\n" not in err


def test_lm_saved_by_two_processes_resumes_on_one(tmp_path, text):
    common = [*TINY_LM, "--data", str(text), "--cache-dir", str(tmp_path / "cache"), "--ckpt-every", "2"]
    _torchrun("launch.lm", [*common, "--max-steps", "2", "--out", str(tmp_path / "a")], ROOT)
    marker = checkpoints.latest(tmp_path / "a" / "ckpt")[1]
    assert marker["processes"] == 2 and marker["step"] == 2
    assert lm.main([*common, "--max-steps", "4", "--out", str(tmp_path / "a"), "--resume", "--cpu"]) == 0
    assert [r["step"] for r in _rows(tmp_path / "a/metrics.jsonl")] == [2, 4]
