"""Downstream evaluation of megatron-rlp checkpoints: generated reasoning tasks with held-out
splits (`tasks`), answer extraction, matching and pass@k (`answers`), checkpoint loading into
any layout (`loading`), decoding and answer log-likelihoods on the rollout engine (`decode`),
benchmark runs with and without thoughts (`benchmark`), and lm-eval support: an adapter
(`lm_eval_adapter`, needs the `eval` extra) and local task files (`lm_eval_tasks`)."""
