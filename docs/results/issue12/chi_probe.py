"""Where chi sits in the bottom set's scale during SST-2 training (seed 0, first-gradient, the
job's model and data order): the probe behind docs/results/issue12/README.md, "The
BregTop rows". Run from the repository root: python docs/results/issue12/chi_probe.py
bregtop-f-v2 300 (method, steps; prints the statistics at step 50 and at the last step).

The top set, chi and both scales come from the library's own Algorithm 2 selection
(``select_top_set`` on the root spectrum, ``inverse_power`` with the optimizer's eps), so the
baseline's scale is ``1 / (sqrt(S) + eps)``, what the same state would give with rho = 1."""
import statistics
import sys

import torch
from probe_setup import probe_setup

from bregtop_dist.core.precondition import inverse_power, select_top_set, spectrum_root, top_mask
from launch.sst2 import mse

STATS = ["chi / top-edge scale", "frac bottom with baseline scale > chi (damped)", "chi / median bottom scale",
         "max bottom scale / top-edge scale", "top share of |update|", "|bregtop update| / |baseline update|",
         "frac bottom with sqrt(S) < eps", "top-edge sqrt(S)", "median bottom sqrt(S)"]


def block_stats(lam_l, lam_r, mt, cfg):
    """STATS for one stack's blocks: lam (B, m), (B, n) eigenvalues, mt (B, m, n) momentum."""
    root_l, root_r = spectrum_root(lam_l.float()), spectrum_root(lam_r.float())
    top = select_top_set(root_l, root_r, cfg.resolved_rho, cfg.resolved_q, cfg.resolved_c, cfg.eps, power=1.0)
    root_s = root_l[:, :, None] * root_r[:, None, :]
    in_top = top_mask(root_s, top)
    base = inverse_power(root_s, cfg.eps, power=1.0)  # the baseline's scale, every entry
    rows = []
    for b in range(root_s.shape[0]):
        t, bot, chi = in_top[b], base[b][~in_top[b]], top.chi[b]
        edge = base[b][t].max()
        exact, breg = mt[b] * base[b], torch.where(t, mt[b] * base[b], mt[b] * chi)
        rows.append([float(chi / edge), float((bot > chi).float().mean()), float(chi / bot.median()),
                     float(bot.max() / edge), float(breg[t].norm() / breg.norm()), float(breg.norm() / exact.norm()),
                     float((root_s[b][~t] < cfg.eps).float().mean()), float(root_s[b][t].min()),
                     float(root_s[b][~t].median())])
    return rows


def main() -> None:
    torch.set_num_threads(1)
    method, steps = sys.argv[1], int(sys.argv[2])
    model, opt, cfg, loader = probe_setup(method)
    for step, batch in enumerate(loader, start=1):
        loss = mse(model(batch["ids"], batch["mask"]), batch["labels"], "mean")
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step in (50, steps):
            rows = [r for stack in opt.kron_stacks.values()
                    for r in block_stats(stack.state.lam_L, stack.state.lam_R, stack.state.momentum.float(), cfg)]
            print(f"{method} step {step} loss {loss.item():.3f}: blocks {len(rows)}, eps {cfg.eps:g}")
            for i, name in enumerate(STATS):
                vals = [r[i] for r in rows]
                print(f"   {name}: median {statistics.median(vals):.3g} [min {min(vals):.3g}, max {max(vals):.3g}]")
        if step >= steps:
            break


if __name__ == "__main__":
    main()
