"""Run under torchrun (gloo, CPU): Accelerate's save_state/load_state and the transformers
Trainer's checkpoints, the savers that write the optimizer from rank 0 alone.

    python -m torch.distributed.run --nproc_per_node W tests/rank0_savers.py MODE DIR

MODE: ``accelerate-save`` (trains SAVE_AT steps, save_state), ``accelerate-resume`` (load_state
at this W, trains to STEPS, compares with the single-process run), ``trainer`` (STEPS steps,
checkpoints every SAVE_AT, writes the final weights; ConsolidateOnSave is the one that
``bregtop_for_trainer`` installs), ``trainer-resume`` (from checkpoint SAVE_AT of ``trainer``,
ConsolidateOnSave given as well, writes the final weights). No process may see an
IncompleteStateDictWarning while saving. Exits non-zero on a failed check.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bregtop_dist import BregTop, IncompleteStateDictWarning, param_groups  # noqa: E402

from dist_scenarios import FP32_TOL, SETTINGS, STEPS, Net, assert_close, batch, reference  # noqa: E402

SAVE_AT = 4


@contextmanager
def _no_incomplete_state_dict(what: str) -> Iterator[None]:
    """Fail if ``state_dict()`` warned that this process's dict lacks other ranks' blocks."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    warned = [str(w.message) for w in caught if issubclass(w.category, IncompleteStateDictWarning)]
    assert not warned, f"{what}: {warned}"


def _single_group() -> dist.ProcessGroup | None:
    if not dist.is_initialized():
        return None
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates every group
    return groups[dist.get_rank()]


def _accelerate(mode: str, out: Path) -> None:
    from accelerate import Accelerator

    from bregtop_dist.integrations.accelerate import consolidate_on_save

    accelerator = Accelerator(cpu=True)
    model = Net()
    opt = BregTop(param_groups(model), **SETTINGS)
    with _no_incomplete_state_dict("prepare"):  # it loads every process's own state_dict back
        wrapped, opt = accelerator.prepare(model, opt)
    consolidate_on_save(accelerator, opt)
    steps = range(SAVE_AT) if mode == "accelerate-save" else range(SAVE_AT, STEPS)
    if mode == "accelerate-resume":
        accelerator.load_state(str(out))
    for step in steps:
        opt.zero_grad(set_to_none=True)
        accelerator.backward(wrapped(batch(step)))
        opt.step()
    if mode == "accelerate-save":
        with _no_incomplete_state_dict("save_state with consolidate_on_save"):  # every process takes a state_dict
            accelerator.save_state(str(out))
    else:
        assert_close(model, reference(_single_group()), FP32_TOL)
    accelerator.wait_for_everyone()


def _tiny_bert_and_data():
    import datasets
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (128, 12), generator=g)
    labels = torch.randint(0, 2, (128,), generator=g)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return model, data


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class _LoadedEqualsSaved(_callback_base()):  # type: ignore[misc]
    """When training starts (after the Trainer loaded its checkpoint): every Kronecker block of
    the saved file is in the optimizer, gathered to rank 0, bit for bit."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
        from state_tensors import kron_blocks

        from bregtop_dist.integrations.accelerate import find_bregtop

        opt = find_bregtop(optimizer)
        opt.consolidate_state_dict(to=0)
        if args.process_index == 0:
            saved = kron_blocks(torch.load(self.path, weights_only=True))
            loaded = kron_blocks(opt.state_dict())
            assert saved.keys() == loaded.keys() and saved, (len(saved), len(loaded))
            for key, block in saved.items():
                assert all(torch.equal(v, loaded[key][k].cpu()) for k, v in block.items()), key


def _trainer(mode: str, out: Path) -> None:
    import transformers

    from bregtop_dist.integrations.hf import ConsolidateOnSave, bregtop_for_trainer

    model, data = _tiny_bert_and_data()
    run_dir = out / ("first" if mode == "trainer" else f"resumed-{os.environ.get('WORLD_SIZE', '1')}")
    args = transformers.TrainingArguments(
        output_dir=str(run_dir), max_steps=STEPS, per_device_train_batch_size=8, save_strategy="steps",
        save_steps=SAVE_AT, report_to=[], use_cpu=True, seed=0, data_seed=0, logging_steps=1, disable_tqdm=True,
        learning_rate=3e-3, weight_decay=0.01,
    )
    trainer = transformers.Trainer(  # "trainer": bregtop_for_trainer's optimizer adds ConsolidateOnSave
        model=model, args=args, train_dataset=data,
        callbacks=[ConsolidateOnSave()] if mode == "trainer-resume" else None,
        optimizer_cls_and_kwargs=bregtop_for_trainer(model, args, precondition_frequency=3, max_precond_dim=8),
    )
    resume = str(out / "first" / f"checkpoint-{SAVE_AT}") if mode == "trainer-resume" else None
    if resume is not None:
        trainer.add_callback(_LoadedEqualsSaved(Path(resume) / "optimizer.pt"))
    with _no_incomplete_state_dict(f"{mode}'s checkpoints"):
        trainer.train(resume_from_checkpoint=resume)
    consolidating = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ConsolidateOnSave)]
    assert len(consolidating) == 1, trainer.callback_handler.callbacks
    from bregtop_dist.integrations.accelerate import find_bregtop

    groups = find_bregtop(trainer.optimizer).param_groups  # the TrainingArguments' lr and decay, every group
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [(3e-3, 0.01)] * len(groups), groups
    if trainer.args.process_index == 0:
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, run_dir / "final.pt")


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if mode.startswith("accelerate"):
        _accelerate(mode, out)
    else:
        _trainer(mode, out)
    gc.collect()  # anything the run left in reference cycles goes while gloo is still up, not at exit
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
