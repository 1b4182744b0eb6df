"""GPU kernels for BregTop's masked preconditioning (Triton).

Empty in this version: the kernels, their dispatch and interpreter tests are the subject of
the Triton-kernels issue. Until then ``kron_precondition(..., backend="triton")`` raises and
``backend="auto"`` runs the torch path on every device.
"""
