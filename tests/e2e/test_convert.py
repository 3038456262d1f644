"""Hugging Face <-> Megatron conversion on tiny random models built from config (no hub):
logits equal the HF forward within 1e-4 (fp32, CPU), HF -> Megatron -> HF gives identical
tensors, and a converted Qwen3 loads via `train.load`, trains RLP steps and exports back.
MoE: Qwen3-MoE (MoE and dense layers) and Nemotron-H with `moe` layers (sigmoid router,
selection bias, scaling factor, shared expert) convert both ways the same; MoE models trained
here export to HF models that transformers loads with the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
HF_REF = str(ROOT / "tests" / "e2e" / "hf_reference.py")
TOKENIZER = "tests/assets/tiny_bpe/tokenizer.json"


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # Not the rendezvous variables an in-process `distributed.initialize` left behind.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def megatron_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    from megatron_rlp import distributed
    from megatron_rlp.config import RunConfig
    from megatron_rlp.convert import load_megatron

    distributed.initialize(RunConfig())
    try:
        model, _, _ = load_megatron(ckpt)
        model.eval()
        with torch.no_grad():
            return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    finally:
        distributed.shutdown()


def safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    run(HF_REF, "make", "qwen3", str(root / "hf"))
    run("tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", str(root / "hf"),
        "--out", str(root / "meg"), "--tokenizer", TOKENIZER)
    return root


@pytest.mark.parametrize("arch", ["qwen3", "nemotron_h", "qwen3_moe", "nemotron_h_moe"])
def test_hf_to_megatron_logits_and_round_trip(arch, qwen3, tmp_path):
    if arch == "qwen3":
        root = qwen3
    else:  # Nemotron-H M-M*-M- / MEM*E; Qwen3-MoE with layers MoE, dense, MoE
        root = tmp_path
        run(HF_REF, "make", arch, str(root / "hf"))
        run("tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", str(root / "hf"),
            "--out", str(root / "meg"))
    ref = torch.load(root / "hf" / "ref.pt")
    logits = megatron_logits(root / "meg", ref["ids"])
    assert logits.shape == ref["logits"].shape
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)

    run("tools/convert_checkpoint.py", "megatron-to-hf", "--checkpoint", str(root / "meg"),
        "--out", str(root / "back"))
    before, after = safetensors(root / "hf"), safetensors(root / "back")
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    c0 = json.loads((root / "hf" / "config.json").read_text())
    c1 = json.loads((root / "back" / "config.json").read_text())
    assert {k: v for k, v in c1.items() if k in c0} == c0
    if arch.endswith("moe"):  # what transformers builds from the export: the same model
        run(HF_REF, "logits", str(root / "back"), str(root / "hf" / "ref.pt"),
            str(tmp_path / "back_logits.pt"))
        torch.testing.assert_close(torch.load(tmp_path / "back_logits.pt"), ref["logits"],
                                   atol=0, rtol=0)


@pytest.mark.parametrize("config", ["tiny_moe_cpu", pytest.param(
    "tiny_hybrid_moe_cpu", marks=pytest.mark.slow)])
def test_trained_moe_model_exports_to_transformers(config, tmp_path):
    """An MoE model trained here (2 NTP steps: the expert bias moves off zero) exports without
    a template to Qwen3-MoE / Nemotron-H; transformers loads it and its logits equal the
    product's over the real vocabulary, and converting it back in gives the same weights.
    (norm_epsilon 1e-5: the only Nemotron-H value with Mamba layers, refusals.py.)"""
    run("pretrain_rlp.py", "--config", f"examples/configs/{config}.yaml",
        "model.norm_epsilon=1e-5", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.moe_ffn_hidden_size=32",
        "model.mamba_num_heads=8", "model.mamba_head_dim=16", "model.mamba_state_dim=16",
        "train.objective=ntp", "data.ntp_seq_length=32", "data.ntp_batch_size=4",
        "train.steps=2", f"train.save={tmp_path / 'run'}", "device.num_threads=1")
    run("tools/convert_checkpoint.py", "megatron-to-hf", "--checkpoint", str(tmp_path / "run"),
        "--out", str(tmp_path / "hf"))
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    weights = safetensors(tmp_path / "hf")
    if config == "tiny_moe_cpu":
        assert hf["model_type"] == "qwen3_moe" and hf["num_experts"] == 8
        assert "model.layers.3.mlp.experts.7.gate_proj.weight" in weights
    else:
        assert hf["model_type"] == "nemotron_h" and hf["routed_scaling_factor"] == 2.5
        bias = weights["backbone.layers.1.mixer.gate.e_score_correction_bias"]
        assert bias.abs().max() > 0  # trained: the bias moved, and is carried

    ids = torch.randint(0, 261, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save({"ids": ids}, tmp_path / "ids.pt")
    run(HF_REF, "logits", str(tmp_path / "hf"), str(tmp_path / "ids.pt"),
        str(tmp_path / "hf_logits.pt"))
    ours = megatron_logits(tmp_path / "run", ids)
    torch.testing.assert_close(torch.load(tmp_path / "hf_logits.pt"), ours[..., :261],
                               atol=1e-4, rtol=0)

    run("tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", str(tmp_path / "hf"),
        "--out", str(tmp_path / "back"))
    run("tools/convert_checkpoint.py", "megatron-to-hf", "--checkpoint", str(tmp_path / "back"),
        "--out", str(tmp_path / "hf2"))
    again = safetensors(tmp_path / "hf2")
    assert again.keys() == weights.keys()
    for k in weights:
        assert torch.equal(again[k], weights[k]), k


def test_converted_qwen3_trains_and_exports(qwen3, tmp_path):
    import yaml

    model = yaml.safe_load((qwen3 / "meg" / "model.yaml").read_text())["model"]
    assert model["make_vocab_size_divisible_by"] == 512 and model["rotary_base"] == 1_000_000
    config = {  # the model section comes from the conversion's model.yaml, a second --config
        "rlp": {"contexts_per_step": 2, "group_size": 2, "max_thought_tokens": 4,
                "min_prefix_tokens": 8, "max_prefix_tokens": 32},
        "data": {"corpus": "data/corpus.jsonl", "tokenizer": TOKENIZER},
        "train": {"steps": 2, "save": str(tmp_path / "run"), "load": str(qwen3 / "meg")},
        "optimizer": {"lr": 1e-3},
        "device": {"type": "cpu", "num_threads": 2},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    # Without it: the model section's defaults do not fit, and the line says what to add.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    alone = subprocess.run([sys.executable, "pretrain_rlp.py", "--config",
                            str(tmp_path / "run.yaml"), "model.hidden_size=64",
                            "model.num_attention_heads=4"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)
    assert alone.returncode == 2 and "does not fit the configured model" in alone.stderr
    assert f"--config {qwen3 / 'meg' / 'model.yaml'}" in alone.stderr, alone.stderr
    proc = run("pretrain_rlp.py", "--config", str(tmp_path / "run.yaml"), "--config",
               str(qwen3 / "meg" / "model.yaml"), timeout=600)
    assert "warm-started" in proc.stdout, proc.stdout

    run("tools/convert_checkpoint.py", "megatron-to-hf", "--checkpoint", str(tmp_path / "run"),
        "--out", str(tmp_path / "export"), "--template", str(qwen3 / "hf"))
    exported, initial = safetensors(tmp_path / "export"), safetensors(qwen3 / "hf")
    assert exported.keys() == initial.keys()
    assert any(not torch.equal(exported[k], initial[k]) for k in initial), "no training?"
    run(HF_REF, "logits", str(tmp_path / "export"), str(qwen3 / "hf" / "ref.pt"),
        str(tmp_path / "hf_logits.pt"))
    ids = torch.load(qwen3 / "hf" / "ref.pt")["ids"]
    torch.testing.assert_close(megatron_logits(tmp_path / "run", ids),
                               torch.load(tmp_path / "hf_logits.pt"), atol=1e-4, rtol=0)


def test_export_refuses_a_template_the_weights_do_not_fit(qwen3, tmp_path):
    """megatron-to-hf keeps template keys: a template with YaRN (or a sliding window, MoE
    fields, ...) would describe another forward. Refused: exit 2, one line, nothing written."""
    template = tmp_path / "template"
    template.mkdir()
    hf = json.loads((qwen3 / "hf" / "config.json").read_text())
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0,
                          "original_max_position_embeddings": 32}
    (template / "config.json").write_text(json.dumps(hf))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "megatron-to-hf",
                           "--checkpoint", str(qwen3 / "meg"), "--out", str(tmp_path / "out"),
                           "--template", str(template)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: megatron-to-hf: qwen3"), lines
    assert "rope_scaling.rope_type='yarn'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_export_keeps_only_the_real_vocabulary(tmp_path):
    """A model trained with 512 token ids and `make_vocab_size_divisible_by=384` has 768
    embedding and (untied) output rows. The export keeps the tokenizer's 512: its HF logits
    equal the product's forward over ids < 512, and HF `generate` never samples a padded id
    (with the padding rows kept, ~1/3 of the probability sat on ids 512-767)."""
    run("pretrain_rlp.py", "--config", "examples/configs/tiny_cpu.yaml",
        "model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.max_sequence_length=96", "model.make_vocab_size_divisible_by=384",
        "model.untie_embeddings_and_output_weights=true", f"data.tokenizer={TOKENIZER}",
        "train.objective=ntp", "data.ntp_seq_length=32", "data.ntp_batch_size=4",
        "train.steps=2", f"train.save={tmp_path / 'run'}", "device.num_threads=1")
    run("tools/convert_checkpoint.py", "megatron-to-hf", "--checkpoint", str(tmp_path / "run"),
        "--out", str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 512
    weights = safetensors(tmp_path / "hf")
    assert weights["model.embed_tokens.weight"].shape[0] == 512
    assert weights["lm_head.weight"].shape[0] == 512

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save({"ids": ids}, tmp_path / "ids.pt")
    run(HF_REF, "logits", str(tmp_path / "hf"), str(tmp_path / "ids.pt"),
        str(tmp_path / "hf_logits.pt"))
    ours = megatron_logits(tmp_path / "run", ids)
    assert ours.shape[-1] == 768  # the product's padded forward
    torch.testing.assert_close(torch.load(tmp_path / "hf_logits.pt"), ours[..., :512],
                               atol=1e-4, rtol=0)

    run(HF_REF, "generate", str(tmp_path / "hf"), str(tmp_path / "gen.pt"))
    sampled = torch.load(tmp_path / "gen.pt")["ids"]
    assert sampled.numel() == 8 * 48 and int(sampled.max()) < 512


def test_use_checkpoint_args_reads_this_projects_checkpoint(qwen3):
    """`train.use_checkpoint_args=true` takes the model section from a converted (or any of
    this project's) checkpoint, as from a Megatron-LM one: the converted Qwen3's sizes and
    RoPE theta, the configured `|` split kept."""
    from megatron_rlp.startup import load_config

    cfg = load_config(None, ("train.use_checkpoint_args=true", f"train.load={qwen3 / 'meg'}",
                             f"data.tokenizer={TOKENIZER}", "model.hybrid_layer_pattern=*-|*-",
                             "parallel.pipeline_model_parallel_size=2"), world_size=2)
    assert (cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.model.num_query_groups,
            cfg.model.rotary_base, cfg.model.make_vocab_size_divisible_by) == \
        (64, 4, 2, 1_000_000, 512)
    assert cfg.model.hybrid_layer_pattern == "*-|*-"
