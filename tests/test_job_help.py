"""Every option of the SST-2 and language-model jobs says what it does in ``--help``: the job's
own from its HELP, BregTop's from BregTopConfig's field documentation."""

from __future__ import annotations

import dataclasses

import pytest

from bregtop_dist import BregTopConfig
from launch import lm, sst2
from launch.jobconfig import OPTIMIZER_FIELD, field_docs, optimizer_options


@pytest.mark.parametrize("module,cls", [(sst2, sst2.SST2Config), (lm, lm.LMConfig)])
def test_every_option_has_a_help_text(module, cls, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside a help text
    fields = {f.name for f in dataclasses.fields(cls)} - {OPTIMIZER_FIELD}
    assert set(cls.HELP) == fields
    assert all(len(text.split()) >= 2 for text in cls.HELP.values())
    with pytest.raises(SystemExit):
        module.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in fields:
        assert " ".join(cls.HELP[name].split()) in out, name
    docs = field_docs(BregTopConfig)
    nested = optimizer_options(cls)
    assert "lr" in nested and "method" not in nested
    for name in nested:
        assert f"--{name.replace('_', '-')}" in out and len(docs[name].split()) >= 2 and docs[name] in out, name
