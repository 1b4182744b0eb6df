"""GPU kernels for BregTop (Triton); each has a torch reference it is tested against.

- :mod:`triton_kernels.masked_scale`: Algorithm 2's masked scaling ``Mt * W`` in one pass,
  one launch per stack of same-shape blocks (reference:
  ``bregtop_dist.core.precondition.apply_top_set``).
- :mod:`triton_kernels.rotated_stats`: the eigenvalue statistics of Algorithm 1 (weighted
  row and column sums of the squared rotated gradient) fused with the rotated momentum
  update (reference: the torch branch of ``bregtop_dist.core.block_step``).

On a CPU the tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``).
``bregtop_dist.core.dispatch`` decides when the optimizer and ``kron_precondition`` use them.
"""
