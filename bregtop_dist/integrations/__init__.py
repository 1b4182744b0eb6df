"""Adapters for the engines users launch with (DeepSpeed, Accelerate, the transformers
Trainer). Each imports its engine lazily, so ``bregtop_dist`` imports without them."""
