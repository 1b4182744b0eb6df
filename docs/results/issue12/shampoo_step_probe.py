"""Why the Shampoo row (p = 1/4) misses 0.05: its steps are smaller than the other rows' at the
same lr. The probe behind docs/results/issue12/README.md, "Why Shampoo misses". Run from the
repository root (seed 0, first-gradient, the job's model and data order, one thread):

  python docs/results/issue12/shampoo_step_probe.py sizes 100      # update RMS / lr per block, shampoo and kl
  python docs/results/issue12/shampoo_step_probe.py train 2000 12  # shampoo, Kronecker lr x12 (Adam lr kept)

``sizes`` prints, at steps 10, 50 and the last, the median over the Kronecker blocks of
RMS(weight change) / lr for shampoo and kl. ``train`` runs shampoo with the Kronecker group's
lr multiplied by the factor and prints the EMA(0.98) of the training loss every 100 steps and
the step where it first falls below 0.05."""
import statistics
import sys

import torch
from probe_setup import probe_setup

from launch.sst2 import mse


def setup(method: str, kron_lr_factor: float = 1.0):
    """The job's model (seed 0), optimizer and loader, and the Kronecker groups, whose lr is
    multiplied by the factor (the Adam group's is kept)."""
    model, opt, _, loader = probe_setup(method)
    kron = [g for g in opt.param_groups if g["bregtop"]]
    for g in kron:
        g["lr"] = g["lr"] * kron_lr_factor
    return model, opt, kron, loader


def sizes(steps: int) -> None:
    for method in ("shampoo", "kl"):
        model, opt, kron, loader = setup(method)
        params = [p for g in kron for p in g["params"]]
        for step, batch in enumerate(loader, start=1):
            mse(model(batch["ids"], batch["mask"]), batch["labels"], "mean").backward()
            before = [p.detach().clone() for p in params]
            opt.step()
            opt.zero_grad()
            if step in (10, 50, steps):
                ratios = [float((p.detach() - b).square().mean().sqrt()) / kron[0]["lr"] for p, b in zip(params, before)]
                shapes = sorted({tuple(p.shape) for p in params})
                print(f"{method} step {step}: RMS(update)/lr over {len(ratios)} blocks {shapes}: median "
                      f"{statistics.median(ratios):.3g} [min {min(ratios):.3g}, max {max(ratios):.3g}]", flush=True)
            if step >= steps:
                break


def train(steps: int, factor: float) -> None:
    model, opt, kron, loader = setup("shampoo", factor)
    ema, reached, step = 0.0, None, 0
    while step < steps:
        for batch in loader:
            loss = mse(model(batch["ids"], batch["mask"]), batch["labels"], "mean")
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            ema = loss.item() if step == 1 else 0.98 * ema + 0.02 * loss.item()
            if reached is None and ema < 0.05:
                reached = step
            if step % 100 == 0:
                print(f"shampoo, Kronecker lr x{factor:g}: step {step} ema {ema:.4f}", flush=True)
            if step >= steps:
                break
    print(f"shampoo, Kronecker lr x{factor:g}: steps to EMA < 0.05: {reached or f'> {steps}'}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "sizes":
        sizes(int(sys.argv[2]))
    else:
        train(int(sys.argv[2]), float(sys.argv[3]))
