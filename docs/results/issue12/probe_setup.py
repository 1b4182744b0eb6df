"""What the issue-12 probes share: the SST-2 job's model (seed 0), data order and optimizer
grouping, built from ``launch.sst2``'s own settings and ``make_optimizer``, so a probe trains
as a Table 4 row does (first-gradient, no eig_floor, lr 1e-3)."""
import torch
from torch.utils.data import DataLoader

from bregtop_dist import BregTop, BregTopConfig
from launch.models import EncoderClassifier
from launch.sst2 import SST2Config, make_optimizer
from launch.sst2_data import Encoded, collate, load_sst2, wordpiece


def probe_setup(method: str) -> tuple[torch.nn.Module, BregTop, BregTopConfig, DataLoader]:
    """The model, optimizer, its settings and the training loader of the job's ``method`` row, seed 0."""
    job = SST2Config()
    tr, _ = load_sst2(job.train_file, job.dev_file, None)
    tok = wordpiece(tr.sentences, job.vocab_size, job.cache_dir)
    torch.manual_seed(0)
    model = EncoderClassifier(tok.get_vocab_size(), job.dim, job.layers, job.heads, job.ff, job.max_len)
    cfg = BregTopConfig(method=method, lr=1e-3, eig_floor=0.0, init="first-gradient")
    opt = make_optimizer(model, cfg.as_defaults())
    assert isinstance(opt, BregTop)
    loader = DataLoader(Encoded(tr, tok, job.max_len), batch_size=job.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate, generator=torch.Generator().manual_seed(0))
    return model, opt, cfg, loader
