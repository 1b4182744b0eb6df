"""No silently incomplete checkpoint: ``BregTop.state_dict()`` taken on one rank of a
multi-process run without ``consolidate_state_dict()`` warns, naming each saver's fix; the
sharded save of torch.distributed.checkpoint, single-process runs and consolidated ranks do
not; and the Trainer that builds BregTop through ``bregtop_for_trainer`` consolidates itself
(its 2-process checkpoints are checked whole in test_rank0_savers)."""

from __future__ import annotations

import pytest
import torch
from ckpt_scenarios import WARNING_SCENARIOS, incomplete_warnings

from bregtop_dist import BregTop, IncompleteStateDictWarning, param_groups

from dist_harness import run_scenarios
from dist_scenarios import SETTINGS, Net, train


def test_on_two_ranks_state_dict_warns_until_consolidated_and_dcp_does_not(tmp_path):
    results = run_scenarios(2, list(WARNING_SCENARIOS), tmp_path, "ckpt_scenarios")
    failures = [f"{name}, rank {r}:\n{v}" for name, per_rank in results.items() for r, v in enumerate(per_rank) if v != "ok"]
    assert not failures, "\n".join(failures)


def test_single_process_state_dict_does_not_warn():
    model = Net()
    opt = BregTop(param_groups(model), **SETTINGS)
    assert incomplete_warnings(opt.state_dict) == []
    train(model, opt, range(2))
    assert incomplete_warnings(opt.state_dict) == []
    assert issubclass(IncompleteStateDictWarning, UserWarning)


def _tiny_trainer(tmp_path, **extra):
    transformers = pytest.importorskip("transformers")
    from bregtop_dist.integrations.hf import bregtop_for_trainer

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=1e-3)
    kwargs = extra.pop("optimizer_cls_and_kwargs", None) or bregtop_for_trainer(model, args)
    return transformers.Trainer(model=model, args=args, optimizer_cls_and_kwargs=kwargs, **extra)


def _consolidating(trainer) -> int:
    from bregtop_dist.integrations.hf import ConsolidateOnSave

    return sum(isinstance(cb, ConsolidateOnSave) for cb in trainer.callback_handler.callbacks)


def test_bregtop_for_trainer_installs_consolidate_on_save_once(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    assert _consolidating(trainer) == 0  # the Trainer builds the optimizer when training starts
    trainer.create_optimizer()
    assert _consolidating(trainer) == 1

    from bregtop_dist.integrations.hf import ConsolidateOnSave

    given = _tiny_trainer(tmp_path, callbacks=[ConsolidateOnSave()])
    given.create_optimizer()
    assert _consolidating(given) == 1

    plain = _tiny_trainer(tmp_path, optimizer_cls_and_kwargs=(BregTop, {"lr": 1e-3}))
    plain.create_optimizer()
    assert _consolidating(plain) == 0  # BregTop itself, not the factory: the callbacks are the user's
