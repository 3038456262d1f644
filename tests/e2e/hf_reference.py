"""Hugging Face side of the conversion tests, run in its own process (the CPU backend's torch
patches, active in the test process once any Megatron test ran, change what
`from_pretrained` builds).

    python tests/e2e/hf_reference.py make ARCH DIR      tiny random model -> DIR (+ DIR/ref.pt)
    python tests/e2e/hf_reference.py logits DIR REF OUT  logits of DIR on REF's ids (ref.pt)
    python tests/e2e/hf_reference.py generate DIR OUT    sampled continuations of DIR (ids)
"""

import sys
import warnings

import torch

warnings.filterwarnings("ignore")
VOCAB, SEQ = 512, 24  # tests/assets/tiny_bpe has 512 ids, <think>/</think> included


def make(arch: str, out: str) -> None:
    torch.manual_seed(0)
    if arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                          rms_norm_eps=1e-6, eos_token_id=0, bos_token_id=0)
        model = Qwen3ForCausalLM(cfg)
    elif arch == "qwen3_moe":  # layers 0 and 2 MoE, layer 1 dense (mlp_only_layers)
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                             rms_norm_eps=1e-6, num_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1],
                             eos_token_id=0, bos_token_id=0)
        model = Qwen3MoeForCausalLM(cfg)
    elif arch == "nemotron_h_moe":  # Nemotron 3's router: sigmoid, bias, scaling, shared expert
        from transformers import NemotronHConfig, NemotronHForCausalLM

        cfg = NemotronHConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              hybrid_override_pattern="MEM*E", num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                              tie_word_embeddings=False, mamba_num_heads=8, mamba_head_dim=16,
                              ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
                              n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                              moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
                              routed_scaling_factor=2.5, norm_topk_prob=True)
        model = NemotronHForCausalLM(cfg)
    else:
        from transformers import NemotronHConfig, NemotronHForCausalLM

        cfg = NemotronHConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=7, hybrid_override_pattern="M-M*-M-",
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=512, tie_word_embeddings=False,
                              mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
                              n_groups=2, conv_kernel=4, chunk_size=16)
        model = NemotronHForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, so a mix-up of norm weights shows
        for name, p in model.named_parameters():
            if any(k in name for k in ("norm", ".D", "dt_bias", "conv1d.bias")):
                p.add_(0.2 * torch.randn_like(p))
            if name.endswith("gate.weight"):  # routers: clear top-k choices, no near-ties
                p.copy_(0.5 * torch.randn_like(p))
            if name.endswith(("experts.gate_up_proj", "experts.up_proj", "experts.down_proj")):
                p.copy_(0.1 * torch.randn_like(p))  # stacked experts: not left uninitialised
        for name, buf in model.named_buffers():  # a selection bias that changes the choice
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.3 * torch.randn_like(buf))
    model.eval().save_pretrained(out)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, f"{out}/ref.pt")


def logits(directory: str, ref: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.load(ref)["ids"]
    with torch.no_grad():
        torch.save(model(ids).logits, out)


def generate(directory: str, out: str) -> None:
    """`generate` with sampling at temperature 1 (no top-k/top-p): 8 rows of 48 new tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (8, 4))
    with torch.no_grad():
        ids = model.generate(prompt, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=48, min_new_tokens=48, pad_token_id=0)
    torch.save({"ids": ids[:, prompt.shape[1]:], "vocab_size": model.config.vocab_size}, out)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "generate":
        generate(sys.argv[2], sys.argv[3])
    else:
        logits(sys.argv[2], sys.argv[3], sys.argv[4])
