"""Distribution of BregTop's Kronecker blocks over ranks: who holds which elements (layout),
who owns which block and when it refreshes (assignment), how gradients reach owners and
updates come back (exchange), and the checks that keep every rank in step (checks)."""
