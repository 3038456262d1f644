"""Downstream evaluation of megatron-rlp checkpoints: generated reasoning tasks with held-out
splits (`tasks`), answer extraction and pass@k (`answers`), checkpoint loading (`loading`),
decoding and answer log-likelihoods on the rollout engine (`decode`), benchmark runs
(`benchmark`) and an lm-eval adapter (`lm_eval_adapter`)."""
