"""Mamba-2 layers for hybrid models (Nemotron-H), on Megatron-Core's own `MambaMixer`.

- `ops`: pure-torch Mamba-2 kernels (chunked SSD scan, fused split-conv-scan, causal conv,
  gated RMSNorm, one-step state updates) with mamba_ssm's / causal_conv1d's signatures.
- `adapter`: binds into `megatron.core.ssm.mamba_mixer` either mamba-ssm's kernels (both
  mamba-ssm and causal-conv1d import, CUDA) or these; the choice goes into the metrics.
- `mixer`: `LocalMambaMixer` / `LocalMambaLayer` (padding masks, batched static decoding,
  TP-invariant initialisation), used by `models.local_spec` for `M` layers.
- `inference_state`: the decoding cache layout (batch on dim 1 for every layer kind) and
  `fork_cached_states`.
"""

from megatron_rlp.models.mamba.inference_state import MambaState, fork_cached_states

__all__ = ["MambaState", "fork_cached_states"]
