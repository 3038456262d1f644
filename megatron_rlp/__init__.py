"""megatron-rlp: RLP (reinforcement as a pretraining objective) on Megatron-Core."""
