"""Run under torchrun (gloo, CPU): the ways a user reaches DeepSpeed with the shipped JSONs.

    python -m torch.distributed.run --nproc_per_node W tests/deepspeed_entry_points.py MODE DIR

MODE: ``library`` (``initialize`` with configs/deepspeed/zero2.json as the README shows it),
``plain`` (``deepspeed.initialize`` with a BregTop the user built, then ``attach``),
``trainer-deepspeed`` / ``trainer-ddp`` (the transformers Trainer with
configs/deepspeed/trainer/zero2.json, and without DeepSpeed; each writes its final weights to
DIR/MODE.pt). Exits non-zero on a failed check.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bregtop_dist import BregTop, param_groups  # noqa: E402
from bregtop_dist.integrations.deepspeed import (  # noqa: E402
    attach,
    fill_auto_batch,
    initialize,
    load_config,
    optimizer_block,
)

from dist_scenarios import FP32_TOL, Net, assert_close, batch, reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "configs/deepspeed/zero2.json"
TRAINER_CONFIG = ROOT / "configs/deepspeed/trainer/zero2.json"
STEPS = 12  # past the shipped JSON's first basis refresh (precondition_frequency 10)
MICRO = 4  # batch() rows: every rank feeds the same batch


def _single_group() -> dist.ProcessGroup:
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates every group
    return groups[dist.get_rank()]


def _expect(error: type[BaseException], text: str, call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except error as err:
        assert text in str(err), f"{error.__name__} without {text!r}: {err}"
        return
    raise AssertionError(f"no {error.__name__} ({text!r})")


def _train(engine: object) -> None:
    for step in range(STEPS):
        loss = engine(batch(step))  # type: ignore[operator]
        engine.backward(loss)  # type: ignore[attr-defined]
        engine.step()  # type: ignore[attr-defined]


def _library() -> None:
    """The README's call: the shipped JSON's "auto" batch sizes come from micro_batch_size;
    without it the error says which argument to pass. Equal to the single-process run."""
    single = _single_group()
    _expect(ValueError, "pass initialize(..., micro_batch_size=N)", lambda: initialize(model=Net(), config=SHIPPED))
    model = Net()
    engine, _, _, _ = initialize(model=model, config=str(SHIPPED), micro_batch_size=MICRO)
    _train(engine)
    assert_close(model, reference(single, STEPS, **optimizer_block(load_config(SHIPPED)).as_kwargs()), FP32_TOL)


def _plain() -> None:
    """Plain deepspeed.initialize: with the JSON's BregTop block DeepSpeed refuses (its own
    message); with a BregTop built from the block, a step before ``attach`` raises naming
    ``attach`` and changes nothing; after ``attach`` the run equals the single-process run."""
    import deepspeed

    single = _single_group()
    cfg = fill_auto_batch(load_config(SHIPPED), MICRO, None, dist.get_world_size())
    _expect(AssertionError, "BregTop is not a supported DeepSpeed Optimizer",
            lambda: deepspeed.initialize(model=Net(), model_parameters=Net().parameters(), config=cfg))
    block = optimizer_block(cfg)
    del cfg["optimizer"]
    cfg["zero_allow_untested_optimizer"] = True

    model = Net()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    bregtop = block.build(param_groups(model))
    engine, engine_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=bregtop, config=cfg)
    engine.backward(engine(batch(0)))
    _expect(RuntimeError, "attach(bregtop, engine.optimizer)", engine.step)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters()), "a refused step changed a weight"

    model = Net()
    bregtop = block.build(param_groups(model))
    engine, engine_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=bregtop, config=cfg)
    attach(bregtop, engine_optimizer)
    _train(engine)
    assert_close(model, reference(single, STEPS, **block.as_kwargs()), FP32_TOL)


def _trainer(mode: str, out: Path) -> None:
    """The Trainer with the Trainer-ready JSON (its "auto" values filled by the Trainer) and
    AttachZeroFragments; the shipped BregTop JSON is refused by bregtop_for_trainer, naming
    the Trainer-ready one."""
    import transformers
    from rank0_savers import _tiny_bert_and_data

    from bregtop_dist.integrations.accelerate import find_bregtop
    from bregtop_dist.integrations.hf import AttachZeroFragments, bregtop_for_trainer

    model, data = _tiny_bert_and_data()
    common = dict(max_steps=6, per_device_train_batch_size=8, save_strategy="no", report_to=[], use_cpu=True,
                  seed=0, data_seed=0, disable_tqdm=True, learning_rate=3e-3, weight_decay=0.01)
    if mode == "trainer-deepspeed":
        shipped = transformers.TrainingArguments(output_dir=str(out / "shipped"), deepspeed=str(SHIPPED), **common)
        _expect(ValueError, "configs/deepspeed/trainer/zero2.json", lambda: bregtop_for_trainer(model, shipped))
    args = transformers.TrainingArguments(
        output_dir=str(out / mode), deepspeed=str(TRAINER_CONFIG) if mode == "trainer-deepspeed" else None, **common
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[AttachZeroFragments()],
        optimizer_cls_and_kwargs=bregtop_for_trainer(model, args, precondition_frequency=3, max_precond_dim=8),
    )
    trainer.train()
    bregtop = find_bregtop(trainer.optimizer)
    assert isinstance(bregtop, BregTop) and [g["initial_lr"] for g in bregtop.param_groups] == [3e-3] * len(
        bregtop.param_groups)
    if mode == "trainer-deepspeed":
        assert bregtop._source.engine_saves_state, "AttachZeroFragments did not attach the ZeRO fragments"
    if args.process_index == 0:
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, out / f"{mode}.pt")


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if mode in ("library", "plain"):
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        (_library if mode == "library" else _plain)()
    else:
        _trainer(mode, out)
    gc.collect()  # anything the run left in reference cycles goes while gloo is still up, not at exit
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
