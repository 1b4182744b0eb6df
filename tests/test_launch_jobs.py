"""The SST-2 and language-model jobs at tiny sizes: outputs, resume, config files, errors,
and the multi-process paths (torchrun on CPU with DDP and with a DeepSpeed JSON)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bregtop_dist import METHODS, BregTop, BregTopConfig
from bregtop_dist.integrations.deepspeed import load_config, optimizer_block
from launch import lm, sst2
from launch.jobconfig import ConfigError, from_sources
from launch.sst2_data import SHIPPED_VOCABULARIES, load_sst2, wordpiece

ROOT = Path(__file__).resolve().parent.parent
TINY_SST2 = ["--dim", "16", "--layers", "1", "--heads", "2", "--ff", "32", "--vocab-size", "500", "--max-len", "32",
             "--batch-size", "32", "--log-every", "1"]
TINY_LM = ["--preset", "tiny", "--block-size", "16", "--batch-size", "4", "--eval-batches", "1", "--eval-every", "2"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def small_text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text((ROOT / "data/lm/tinyshakespeare/input.txt").read_text()[:20000])
    return path


# ----------------------------------------------------------------------------------- SST-2
def test_sst2_writes_metrics_summary_plot_and_table(tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["--method", "kl,bregtop-vn-v2", "--max-steps", "3", "--out", str(out), "--cache-dir", str(cache), *TINY_SST2]
    assert sst2.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["kl/seed0", "bregtop-vn-v2/seed0"]
    for row in summary.values():
        assert row["final_step"] == 3 and row["steps_to_target"] is None
        assert 0.0 <= row["dev_accuracy"] <= 1.0 and row["wall_time_s"] > 0
    lines = _rows(out / "metrics.jsonl")
    assert [(r["method"], r["step"]) for r in lines] == [(m, s) for m in ("kl", "bregtop-vn-v2") for s in (1, 2, 3)]
    assert lines[0]["ema"] == lines[0]["loss"]  # the EMA starts at the first loss
    assert lines[1]["ema"] == pytest.approx(0.98 * lines[0]["ema"] + 0.02 * lines[1]["loss"])
    assert (out / "ema_loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (out / "ema_loss.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "[kl/seed0] step 1 loss" in printed and "steps<target" in printed
    header = next(line for line in printed.splitlines() if "steps<target" in line)
    assert "paper" not in header  # a 3-step run is not compared with the paper's counts

    # --resume skips what is done with the same settings
    assert sst2.main([*args, "--resume"]) == 0
    assert len(_rows(out / "metrics.jsonl")) == 6
    assert "[kl/seed0] step 1 loss" not in capsys.readouterr().out


def test_sst2_stops_at_the_target_and_runs_all_rows(tmp_path):
    out = tmp_path / "run"
    assert sst2.main(["--method", "all", "--max-steps", "2", "--target-loss", "10", "--out", str(out),
                      "--cache-dir", str(tmp_path / "cache"), *TINY_SST2]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == [f"{m}/seed0" for m in METHODS]
    assert all(row["steps_to_target"] == 1 and row["final_step"] == 1 for row in summary.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "sgd"], "method='sgd' is not allowed"),
        (["--train-file", "nope.tsv"], "SST-2 file 'nope.tsv' does not exist; pass --train-file"),
        (["--ema", "1.5"], "ema=1.5 must be in (0, 1)"),
        (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["--dim", "30", "--heads", "4"], "dim=30 must be a multiple of heads=4"),
        (["--seeds", "0,x"], "seeds='0,x' must be comma-separated int values"),
        (["--seed", "3", "--seeds", "0,1"], "seed=3 and seeds='0,1': set one of them, not both"),
        (["--method", "kl", "--exponent", "0.5"], "exponent=0.5 applies to the shampoo row only"),
        (["--method", "shampoo", "--exponent", "0.3"], "exponent=0.3 is not allowed for method='shampoo'"),
        (["--init", "zeros"], "init='zeros' is unknown; allowed: first-gradient, first-gradient-averaged, first-gradient-unit, kl-methods"),
        (["--init-factor", "0"], "init_factor=0.0 is not allowed"),
    ],
)
def test_sst2_bad_input_is_one_line(args, message, capsys, tmp_path):
    assert sst2.main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m launch.sst2: error: ") and message in err and "\n" not in err


def test_config_files_reject_unknown_keys_and_wrong_types(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methd: kl\n")
    with pytest.raises(ConfigError, match="unknown setting 'methd'; allowed: method, max_steps"):
        from_sources(sst2.SST2Config, bad, sst2.build_parser().parse_args([]))
    bad.write_text("max_steps: many\n")
    with pytest.raises(ConfigError, match="max_steps='many' must be of type int"):
        from_sources(sst2.SST2Config, bad, sst2.build_parser().parse_args([]))
    bad.write_text("max_steps: 10\n")
    cfg = from_sources(sst2.SST2Config, bad, sst2.build_parser().parse_args(["--max-steps", "7"]))
    assert cfg.max_steps == 7  # the command line wins over the file


def test_sst2_seeds_are_rows_with_their_settings_and_resume_skips_them(tmp_path, capsys):
    """Two seeds, init kl-methods, through the CLI: one row per (method, seed), each recording
    the settings BregTop got; --resume with a third seed runs only that seed's rows."""
    out = tmp_path / "run"
    for split, rows in (("train", 1000), ("dev", 100)):  # small files keep the test fast
        lines = (ROOT / f"data/sst2/{split}.tsv").read_text().splitlines(keepends=True)
        (tmp_path / f"{split}.tsv").write_text("".join(lines[: rows + 1]))
    args = ["--method", "kl,shampoo", "--seeds", "0,1", "--init", "kl-methods", "--init-factor", "0.2",
            "--exponent", "0.5", "--max-steps", "2", "--train-file", str(tmp_path / "train.tsv"),
            "--dev-file", str(tmp_path / "dev.tsv"), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            *TINY_SST2]
    assert sst2.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["kl/seed0", "shampoo/seed0", "kl/seed1", "shampoo/seed1"]
    for key, row in summary.items():
        method, seed = key.split("/seed")
        assert (row["method"], row["seed"], row["settings"]["seed"]) == (method, int(seed), seed)
        assert (row["init"], row["init_factor"], row["eig_floor"], row["final_step"]) == ("kl-methods", 0.2, 0.0, 2)
        assert row["settings"]["init"] == "kl-methods" and row["settings"]["init_factor"] == "0.2"
        assert row["exponent"] == 0.5  # the shampoo row's setting; kl's divergence fixes p = 1/2
        assert row["settings"]["exponent"] == ("0.5" if method == "shampoo" else "None")
    lines = _rows(out / "metrics.jsonl")
    assert [(r["seed"], r["method"], r["step"]) for r in lines] == [
        (seed, m, step) for seed in (0, 1) for m in ("kl", "shampoo") for step in (1, 2)]
    assert lines[0]["loss"] != lines[4]["loss"]  # the seed sets the initialisation and the data order
    assert "[shampoo/seed1] step 1 loss" in capsys.readouterr().out

    assert sst2.main([*[a if a != "0,1" else "0,1,2" for a in args], "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["kl/seed0", "shampoo/seed0", "kl/seed1", "shampoo/seed1", "kl/seed2", "shampoo/seed2"]
    assert [r["seed"] for r in _rows(out / "metrics.jsonl")][8:] == [2, 2, 2, 2]
    printed = capsys.readouterr().out
    assert "[kl/seed2] step 1 loss" in printed and "[kl/seed0] step 1 loss" not in printed


def test_sst2_does_not_resume_a_summary_from_before_seeds(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"kl": {"steps_to_target": 5, "settings": {"seed": "0"}}}))
    assert sst2.main(["--method", "kl", "--resume", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "was written before seeds (rows keyed by method)" in err and "\n" not in err


def test_sst2_passes_init_and_exponent_only_to_the_rows_that_take_them():
    import torch

    settings = BregTopConfig(init="kl-methods", init_factor=0.3, eig_floor=1e-3)
    cfg = sst2.SST2Config(method="shampoo,kl", optimizer=settings, exponent=0.5)
    assert cfg.row_config("shampoo").exponent == 0.5 and cfg.row_config("kl").exponent is None
    for method in ("shampoo", "kl"):
        row = cfg.row_config(method)
        assert (row.method, row.init, row.init_factor, row.eig_floor) == (method, "kl-methods", 0.3, 1e-3)
        assert isinstance(BregTop.from_config([torch.nn.Parameter(torch.randn(4, 3))], row), BregTop)
    assert sst2.SST2Config(method="shampoo").row_config("shampoo").exponent is None
    assert sst2.SST2Config(seeds="2, 0,2").seed_list == (2, 0) and sst2.SST2Config(seed=5).seed_list == (5,)


def test_bregtop_settings_nest_in_yaml_and_flatten_on_the_command_line(tmp_path):
    """YAML's optimizer: block maps one-to-one onto BregTopConfig; each field is also an
    option; the command line wins over the file, the file over a DeepSpeed JSON's block, the
    block over BregTop's defaults."""
    path = tmp_path / "job.yaml"
    path.write_text("method: kl\noptimizer:\n  lr: 0.002\n  betas: [0.8, 0.95]\n  precondition_frequency: 7\n")
    parser = sst2.build_parser()
    cfg = from_sources(sst2.SST2Config, path, parser.parse_args(["--lr", "0.003", "--adam-betas", "0.85,0.99"]))
    assert cfg.optimizer == BregTopConfig(lr=0.003, betas=(0.8, 0.95), precondition_frequency=7, adam_betas=(0.85, 0.99))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "BregTop", "params": {"lr": 0.01, "eps": 1e-6, "max_precond_dim": 64}}}))
    cfg = from_sources(sst2.SST2Config, path, parser.parse_args(["--deepspeed", str(ds)]))
    assert (cfg.optimizer.lr, cfg.optimizer.eps, cfg.optimizer.max_precond_dim) == (0.002, 1e-6, 64)
    lm_cfg = from_sources(lm.LMConfig, None, lm.build_parser().parse_args(["--weight-decay", "0.1", "--lr", "3e-4"]))
    assert lm_cfg.row_config() == BregTopConfig(method=lm_cfg.method, weight_decay=0.1, lr=3e-4) and lm_cfg.lr == 3e-4


@pytest.mark.parametrize("job,config_cls", [(sst2, sst2.SST2Config), (lm, lm.LMConfig)])
def test_a_deepspeed_json_s_method_is_the_job_s_unless_the_yaml_or_command_line_sets_one(tmp_path, job, config_cls):
    """The JSON's block may name the method (the shipped ones do): the job runs it, whatever
    BregTop's default; a method in the YAML or on the command line wins over it."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "BregTop", "params": {"method": "vn-v2", "lr": 0.01}}}))
    parser = job.build_parser()
    cfg = from_sources(config_cls, None, parser.parse_args(["--deepspeed", str(ds)]))
    assert (cfg.method, cfg.optimizer.method, cfg.optimizer.lr) == ("vn-v2", BregTopConfig.method, 0.01)
    assert from_sources(config_cls, None, parser.parse_args(["--deepspeed", str(ds), "--method", "f-v1"])).method == "f-v1"
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("method: shampoo\n")
    assert from_sources(config_cls, yaml_file, parser.parse_args(["--deepspeed", str(ds)])).method == "shampoo"
    ds.write_text(json.dumps({"optimizer": {"type": "BregTop", "params": {"method": "vn-v2", "bregtop": False}}}))
    with pytest.raises(ConfigError, match=re.escape("--deepspeed: optimizer.params.bregtop is decided by the job")):
        from_sources(config_cls, None, parser.parse_args(["--deepspeed", str(ds)]))


@pytest.mark.parametrize("text,message", [
    ("lr: 0.1\n", "unknown setting 'lr' (BregTop's settings go under optimizer:)"),
    ("optimizer:\n  lrr: 0.1\n", "optimizer.lrr is not a BregTop setting; allowed: lr, rho"),
    ("optimizer:\n  method: kl\n", "optimizer.method is the job's own setting: set method at the top level"),
    ("optimizer:\n  betas: 0.9\n", "betas=0.9 must be a pair of floats in [0, 1)"),
    ("optimizer:\n  rho: 0.5\nmethod: kl\n", "rho=0.5 is not allowed for method='kl'"),
    ("optimizer: 3\n", "optimizer must be a mapping of BregTop settings, got int"),
])
def test_bad_nested_settings_are_named(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_sources(sst2.SST2Config, path, sst2.build_parser().parse_args([]))


def test_resume_fingerprints_of_the_shipped_table4_configs_are_stable():
    """The nesting keeps the flat fingerprint that --resume compares: the settings recorded by
    rows run before it (lr, precondition_frequency, eig_floor, init, init_factor as strings)."""
    cfg = from_sources(sst2.SST2Config, ROOT / "configs/sst2/table4.yaml", sst2.build_parser().parse_args([]))
    print_ = cfg.fingerprint("kl", 1)
    assert {k: print_[k] for k in ("lr", "precondition_frequency", "eig_floor", "init", "init_factor", "exponent",
                                   "seed")} == {"lr": "0.001", "precondition_frequency": "10", "eig_floor": "0.0",
                                                "init": "kl-methods", "init_factor": "0.1", "exponent": "None",
                                                "seed": "1"}
    assert "betas" not in print_  # defaults beyond the five are left out, as before the nesting
    assert "betas" in sst2.SST2Config(optimizer=BregTopConfig(betas=(0.8, 0.9))).fingerprint("kl", 0)


def test_the_default_settings_use_the_shipped_vocabulary(tmp_path):
    """The WordPiece trainer is not deterministic, so every machine trains the same model only
    if the job's default settings find the shipped 30k vocabulary (and train nothing)."""
    cfg = sst2.SST2Config(cache_dir=tmp_path)
    train, _ = load_sst2(cfg.train_file, cfg.dev_file, cfg.dataset)
    tokenizer = wordpiece(train.sentences, cfg.vocab_size, cfg.cache_dir)
    assert not any(tmp_path.iterdir())
    assert tokenizer.get_vocab_size() == 20831
    assert (SHIPPED_VOCABULARIES / "wordpiece-30000-3a111c3000d0.json").is_file()


# ------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("path", sorted((ROOT / "configs/sst2").glob("*.yaml")), ids=lambda p: p.name)
def test_sst2_configs_parse(path):
    cfg = from_sources(sst2.SST2Config, path, sst2.build_parser().parse_args([]))
    assert cfg.methods


@pytest.mark.parametrize("path", sorted((ROOT / "configs/lm").glob("*.yaml")), ids=lambda p: p.name)
def test_lm_configs_parse(path):
    assert from_sources(lm.LMConfig, path, lm.build_parser().parse_args([])).dims


@pytest.mark.parametrize("path", sorted((ROOT / "configs/deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_select_bregtop(path):
    cfg = load_config(path)
    block = optimizer_block(cfg)  # every setting is valid
    import torch

    assert isinstance(block.build([torch.nn.Parameter(torch.randn(4, 3))]), BregTop)
    assert cfg["zero_optimization"]["stage"] == int(path.stem[-1])


@pytest.mark.parametrize("path", sorted((ROOT / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    expected = {"single_gpu": "NO", "ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    assert str(cfg.distributed_type).split(".")[-1] == expected[path.stem]
    if path.stem == "fsdp2":
        assert raw["fsdp_config"]["fsdp_version"] == 2
    if path.stem.startswith("zero"):
        ds = ROOT / raw["deepspeed_config"]["deepspeed_config_file"]
        assert ds.is_file() and optimizer_block(load_config(ds))


# -------------------------------------------------------------------------------- LM job
def test_lm_resume_continues_exactly(tmp_path, small_text, capsys):
    """Through a warm-up (3 steps, longer than the first run): lr, losses and steps as without the break."""
    common = [*TINY_LM, "--data", str(small_text), "--cache-dir", str(tmp_path / "cache"), "--ckpt-every", "2",
              "--warmup-steps", "3"]
    assert lm.main([*common, "--max-steps", "2", "--out", str(tmp_path / "a")]) == 0
    assert lm.main([*common, "--max-steps", "4", "--out", str(tmp_path / "a"), "--resume"]) == 0
    assert lm.main([*common, "--max-steps", "4", "--out", str(tmp_path / "b")]) == 0
    resumed, straight = _rows(tmp_path / "a/metrics.jsonl"), _rows(tmp_path / "b/metrics.jsonl")
    assert [r["step"] for r in resumed] == [2, 4] == [r["step"] for r in straight]
    for a, b in zip(resumed, straight):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"] and a["lr"] == b["lr"]
    assert [r["lr"] for r in straight] == pytest.approx([2e-3 / 4, 4e-3 / 4])  # the lr of steps 2 and 4
    printed = capsys.readouterr().out
    assert "val ppl" in printed and "\r" not in printed and "step/s" not in printed  # no bar: not a terminal


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "lion"], "method='lion' is not allowed"),
        (["--data", "nope.txt"], "text file 'nope.txt' does not exist; pass --data FILE"),
        (["--resume"], "--resume: no complete checkpoint under"),
        (["--preset", "huge"], "preset='huge' is not allowed"),
        (["--schedule", "linear"], "schedule='linear' is not allowed; use one of constant, cosine"),
        (["--schedule", "cosine", "--warmup-steps", "5", "--max-steps", "5"],
         "warmup_steps=5 must be >= 0 and below max_steps=5"),
        (["--min-lr-ratio", "1.5"], "min_lr_ratio=1.5 must be in [0, 1]"),
        (["--grad-clip", "-1"], "grad_clip=-1.0 must be >= 0 (0: off)"),
        (["--deepspeed", "nope.json"], "--deepspeed: DeepSpeed config 'nope.json' does not exist"),
    ],
)
def test_lm_bad_input_is_one_line(args, message, capsys, tmp_path):
    assert lm.main([*TINY_LM, "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m launch.lm: error: ") and message in err and "\n" not in err


# ---------------------------------------------------------------------- multi-process (CPU)
def _torchrun(module: str, args: list[str], cwd: Path, processes: int = 2) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", module,
         "--cpu", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_sst2_under_torchrun_ddp(tmp_path):
    out = tmp_path / "run"
    printed = _torchrun("launch.sst2", ["--method", "bregtop-vn-v2", "--max-steps", "2", "--out", str(out),
                                        "--cache-dir", str(tmp_path / "cache"), *TINY_SST2], ROOT)
    assert "2 process(es)" in printed
    assert json.loads((out / "summary.json").read_text())["bregtop-vn-v2/seed0"]["final_step"] == 2


def test_lm_under_torchrun_with_deepspeed_zero3_resumes(tmp_path, small_text):
    common = [*TINY_LM, "--data", str(small_text), "--cache-dir", str(tmp_path / "cache"), "--ckpt-every", "2",
              "--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"), "--grad-clip", "1.0"]
    _torchrun("launch.lm", [*common, "--max-steps", "2", "--out", str(tmp_path / "a")], ROOT)
    _torchrun("launch.lm", [*common, "--max-steps", "4", "--out", str(tmp_path / "a"), "--resume"], ROOT)
    _torchrun("launch.lm", [*common, "--max-steps", "4", "--out", str(tmp_path / "b")], ROOT)
    resumed, straight = _rows(tmp_path / "a/metrics.jsonl"), _rows(tmp_path / "b/metrics.jsonl")
    assert [r["step"] for r in resumed] == [2, 4]
    assert resumed[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"], rel=1e-6)
    assert all(r["grad_norm"] > 0 for r in resumed)  # the engine clips (gradient_clipping) and reports the norm


def test_lm_on_meshes_equals_ddp_on_the_same_batches_and_resumes_as_ddp(tmp_path, small_text):
    """``--tp 2`` on 4 processes (2 data-parallel groups) is the 2-process DDP run and
    ``--replicate 2`` on 4 the 4-process one, up to tensor parallelism's rounding; a ``--tp``
    checkpoint resumes under DDP and continues as the uninterrupted DDP run."""
    common = [*TINY_LM, "--data", str(small_text), "--cache-dir", str(tmp_path / "cache"), "--ckpt-every", "2",
              "--grad-clip", "0.5"]
    printed = _torchrun("launch.lm", [*common, "--max-steps", "4", "--out", str(tmp_path / "tp"), "--tp", "2"], ROOT, 4)
    assert "4 process(es)" in printed
    _torchrun("launch.lm", [*common, "--max-steps", "6", "--out", str(tmp_path / "ddp2")], ROOT, 2)
    _torchrun("launch.lm", [*common, "--max-steps", "6", "--out", str(tmp_path / "tp"), "--resume", "--tp", "1"], ROOT, 2)
    _torchrun("launch.lm", [*common, "--max-steps", "4", "--out", str(tmp_path / "hsdp"), "--replicate", "2"], ROOT, 4)
    _torchrun("launch.lm", [*common, "--max-steps", "4", "--out", str(tmp_path / "ddp4")], ROOT, 4)
    tp, ddp2 = _rows(tmp_path / "tp/metrics.jsonl"), _rows(tmp_path / "ddp2/metrics.jsonl")
    hsdp, ddp4 = _rows(tmp_path / "hsdp/metrics.jsonl"), _rows(tmp_path / "ddp4/metrics.jsonl")
    assert [r["step"] for r in tp] == [r["step"] for r in ddp2] == [2, 4, 6]
    for mesh, ddp in ((tp, ddp2), (hsdp, ddp4)):
        for a, b in zip(mesh, ddp):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # clipped on the mesh's DTensors
    assert ddp2[-1]["train_loss"] != ddp2[0]["train_loss"]  # it trained


@pytest.mark.parametrize("args, message", [
    (["--tp", "2"], "--tp and --replicate shard the model over processes: start the job with torchrun"),
    (["--tp", "2", "--deepspeed", "configs/deepspeed/zero2.json"], "do not combine with --deepspeed"),
    (["--tp", "3"], "tp=3 must divide the MLP width 4 x dim = 256"),
])
def test_lm_mesh_options_that_cannot_run_are_one_line(tmp_path, small_text, capsys, args, message):
    code = lm.main([*TINY_LM, "--data", str(small_text), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1",
                    "--out", str(tmp_path / "run"), *args])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


@pytest.mark.parametrize("job", [sst2, lm])
def test_unparsable_option_is_one_line(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--max-steps", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "argument --max-steps: invalid int value: 'many' (see --help)" in err and "\n" not in err


@pytest.mark.parametrize("method", ["adamw", "shampoo"])
def test_sst2_row_that_diverges_ends_and_the_run_goes_on(method, tmp_path, capsys):
    out = tmp_path / "run"
    assert sst2.main(["--method", f"{method},kl", "--lr", "1e9", "--max-steps", "30", "--out", str(out),
                      "--cache-dir", str(tmp_path / "cache"), *TINY_SST2]) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = summary[f"{method}/seed0"]
    assert row["diverged_at"] is not None and row["steps_to_target"] is None
    assert set(summary) == {f"{method}/seed0", "kl/seed0"}
    assert f"[{method}/seed0] diverged" in capsys.readouterr().out
