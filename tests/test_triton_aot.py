"""Every Triton kernel specialisation the optimizer launches compiles for sm_90 and sm_80 on
this CPU machine (Triton compiles ahead of time without a GPU; see triton_aot_compile.py):
cubin is produced, the block index is widened to 64 bits before any offset, and square roots
and divisions round to nearest (no approximate instructions), so compiled results match the
interpreter's and torch's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SCRIPT = Path(__file__).with_name("triton_aot_compile.py")
SPECIALISATIONS = 20  # masked_scale: 2 dtypes x eps 0 or not x power; rotated_stats: 2 x 2 x 2; top_set: 4 shapes


@pytest.mark.skipif(not PTXAS.is_file(), reason="Triton's ptxas is not installed")
@pytest.mark.parametrize("capability", [90, 80])
def test_every_kernel_specialisation_compiles_exactly(capability):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(capability)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == SPECIALISATIONS
    for row in rows:
        assert row["cubin_bytes"] > 0, row
        assert not row["approximate"], row
        assert row["wide_block_index"], row
        assert row["sqrt_rn"] or not row["uses_sqrt"], row
