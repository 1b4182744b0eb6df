"""BregTop inside a transformers Trainer: the paper's grouping in one argument, training on
SST-2 sentences, and an exact resume from a Trainer checkpoint."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from bregtop_dist import BregTop  # noqa: E402
from bregtop_dist.integrations.hf import bregtop_for_trainer  # noqa: E402
from launch.sst2_data import DEFAULT_TRAIN, load_sst2, wordpiece  # noqa: E402

STEPS, SAVE_AT = 6, 3


@pytest.fixture(scope="module")
def sst2_small(tmp_path_factory):
    train, _ = load_sst2(DEFAULT_TRAIN, DEFAULT_TRAIN.with_name("dev.tsv"))
    sentences, labels = train.sentences[:256], train.labels[:256]
    tok = wordpiece(sentences, 400, tmp_path_factory.mktemp("tok"))
    tok.enable_padding(length=24)
    tok.enable_truncation(24)
    enc = tok.encode_batch(sentences)
    ds = datasets.Dataset.from_dict({
        "input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc], "labels": labels,
    })
    return ds, tok.get_vocab_size()


def _model(vocab):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def _trainer(model, ds, out, graft="none", **extra):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=16, save_strategy="steps",
        save_steps=SAVE_AT, report_to=[], use_cpu=True, seed=0, data_seed=0, logging_steps=1,
        disable_tqdm=True, learning_rate=3e-3, **extra,
    )
    kwargs = bregtop_for_trainer(model, args, method="bregtop-vn-v2", precondition_frequency=2, graft=graft)
    return transformers.Trainer(model=model, args=args, train_dataset=ds, optimizer_cls_and_kwargs=kwargs)


@pytest.mark.parametrize("graft", ["none", "adamw"])
def test_trainer_trains_with_the_paper_grouping_and_resumes_exactly(sst2_small, tmp_path, graft):
    """Also with graft='adamw' (its AdamW moments travel in the Trainer's checkpoint)."""
    ds, vocab = sst2_small
    model = _model(vocab)
    trainer = _trainer(model, ds, tmp_path, graft)
    trainer.train()
    opt = trainer.optimizer
    while not isinstance(opt, BregTop):
        opt = opt.optimizer
    kron, adam = opt.param_groups
    assert kron["bregtop"] and not adam["bregtop"] and kron["graft"] == graft
    assert "bert.embeddings.word_embeddings.weight" in adam["param_names"]
    assert "classifier.weight" in adam["param_names"]
    assert "bert.encoder.layer.0.attention.self.query.weight" in kron["param_names"]
    assert sum(len(s.block_ids) for s in opt.kron_stacks.values()) == len(kron["params"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    want = {k: v.detach().clone() for k, v in model.named_parameters()}

    resumed = _model(vocab)
    trainer2 = _trainer(resumed, ds, tmp_path / "again", graft)
    trainer2.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{SAVE_AT}"))
    for name, p in resumed.named_parameters():
        assert torch.allclose(p.detach(), want[name], rtol=1e-6, atol=1e-7), name


def test_bad_settings_fail_before_training(sst2_small):
    _, vocab = sst2_small
    with pytest.raises(ValueError, match="method='nope'"):
        bregtop_for_trainer(_model(vocab), method="nope")


def _groups(trainer):
    opt = trainer.create_optimizer()
    while not isinstance(opt, BregTop):
        opt = opt.optimizer
    return opt.param_groups


def test_lr_and_weight_decay_come_from_the_training_arguments(sst2_small, tmp_path, recwarn):
    _, vocab = sst2_small
    model = _model(vocab)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          learning_rate=2e-4, weight_decay=0.05)
    trainer = transformers.Trainer(model=model, args=args, optimizer_cls_and_kwargs=bregtop_for_trainer(model, args))
    assert [(g["lr"], g["weight_decay"]) for g in _groups(trainer)] == [(2e-4, 0.05), (2e-4, 0.05)]
    assert not [w for w in recwarn if "bregtop_for_trainer" in str(w.message)]

    with pytest.warns(UserWarning, match=r"lr=0.001 is used, not TrainingArguments.learning_rate=0.0002"):
        given = bregtop_for_trainer(model, args, lr=1e-3)
    trainer = transformers.Trainer(model=model, args=args, optimizer_cls_and_kwargs=given)
    assert [g["lr"] for g in _groups(trainer)] == [1e-3, 1e-3]
    with pytest.warns(UserWarning, match="no args and no lr"):
        bregtop_for_trainer(model)


def test_one_tuple_serves_several_trainers(sst2_small, tmp_path):
    """The Trainer pops "params" from an optimizer class's kwargs; the factory's kwargs are
    left as they are, so a second Trainer gets the paper's grouping too."""
    _, vocab = sst2_small
    model = _model(vocab)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=1e-3)
    both = bregtop_for_trainer(model, args, method="kl")
    for _ in range(2):
        groups = _groups(transformers.Trainer(model=model, args=args, optimizer_cls_and_kwargs=both))
        assert [g["bregtop"] for g in groups] == [True, False]
        assert "bert.embeddings.word_embeddings.weight" in groups[1]["param_names"]
        assert groups[0]["method"] == "kl" and groups[0]["lr"] == 1e-3
