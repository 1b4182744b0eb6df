"""GPU kernels for BregTop (Triton); each has a torch reference it is tested against.

- :mod:`triton_kernels.masked_scale`: Algorithm 2's masked scaling ``Mt * W`` in one pass,
  one launch per stack of same-shape blocks (reference:
  ``bregtop_dist.core.precondition.apply_top_set``).

On a CPU the tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``). The
optimizer does not dispatch to them yet: ``kron_precondition(..., backend="auto")`` runs the
torch path on every device.
"""
