"""Pure block math of BregTop: no torch.distributed, no optimizer state management."""
