"""Where chi sits in the bottom set's S^-1/2 during SST-2 training (seed 0, first-gradient, the
job's model and data order): the probe behind docs/results/issue12-partial/README.md, "The
BregTop rows". Run from the repository root: python docs/results/issue12-partial/chi_probe.py
bregtop-f-v2 300 (method, steps; prints the statistics at step 50 and at the last step)."""
import sys, torch
from torch.utils.data import DataLoader
from bregtop_dist import BregTop, BregTopConfig, param_groups
from launch.models import EncoderClassifier
from launch.sst2 import SST2Config, mse
from launch.sst2_data import Encoded, collate, load_sst2, wordpiece
torch.set_num_threads(1)
cfg = SST2Config()
tr, dv = load_sst2(cfg.train_file, cfg.dev_file, None)
tok = wordpiece(tr.sentences, cfg.vocab_size, cfg.cache_dir)
train = Encoded(tr, tok, cfg.max_len)
method, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = EncoderClassifier(tok.get_vocab_size(), 128, 4, 8, 512, 128)
opt = BregTop(param_groups(model, head_names=["head"]), method=method, lr=1e-3, eig_floor=0.0, init="first-gradient")
loader = DataLoader(train, batch_size=128, shuffle=True, drop_last=True, collate_fn=collate, generator=torch.Generator().manual_seed(0))
step = 0
for batch in loader:
    loss = mse(model(batch["ids"], batch["mask"]), batch["labels"], "mean")
    loss.backward(); opt.step(); opt.zero_grad(); step += 1
    if step in (50, steps):
        rows = []
        for key, stack in opt.kron_stacks.items():
            st = stack.state
            lam_l, lam_r = st.lam_L.float(), st.lam_R.float()
            s = lam_l[:, :, None] * lam_r[:, None, :]
            w = s.clamp_min(1e-30).rsqrt()
            c = BregTopConfig(method=method)
            rho, q, cc = c.resolved_rho, c.resolved_q, c.resolved_c
            B, m, n = s.shape
            k = -(-int(rho * m * n * 1000000) // 1000000)
            flat = s.flatten(1)
            order = flat.argsort(-1, descending=True)
            top = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order[:, :k], True)
            for b in range(B):
                wb = w.flatten(1)[b]
                bot = wb[~top[b]]
                chi = cc * torch.quantile(bot.double(), q).float()
                boundary = wb[top[b]].max()
                mt = st.momentum[b].float().flatten()
                upd_exact = (mt * wb)
                upd_breg = torch.where(top[b], mt * wb, mt * chi)
                rows.append((key, float(chi / boundary), float((bot > chi).float().mean()), float(chi / bot.median()),
                             float(bot.max() / boundary), float(upd_breg[top[b]].norm() / upd_breg.norm()),
                             float(upd_breg.norm() / upd_exact.norm())))
        import statistics as S
        print(f"{method} step {step} loss {loss.item():.3f}: blocks {len(rows)}")
        for i, name in enumerate(["chi/top-boundary", "frac bottom with S^-1/2 > chi", "chi/median bottom", "max bottom / boundary", "top share of |update|", "|bregtop update| / |exact update|"], start=1):
            vals = [r[i] for r in rows]
            print(f"   {name}: median {S.median(vals):.3g} [min {min(vals):.3g}, max {max(vals):.3g}]")
    if step >= steps: break
