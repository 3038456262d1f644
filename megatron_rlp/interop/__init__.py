"""Interoperability with Megatron-LM: Transformer Engine parameter names (`names`), its
`torch_dist` checkpoints in and out (`megatron_lm`), and RLP as a `megatron.training.pretrain()`
plugin (megatron_rlp/plugin.py)."""
