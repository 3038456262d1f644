"""What a user sees from the tools on bad input, and the Megatron-LM flags they print: errors
are one line naming the flag the user typed (`--load`, `--checkpoint`, `--limit`, `--out`),
exit 2; the exported checkpoint's flags hold only what applies to the model and survive a
shell; the Megatron-LM example's `--help` works. No checkpoint is needed: every refusal here
comes before one would be read (the tools' working paths: tests/e2e)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, flag", [
    (("tools/evaluate.py", "--load", "/nonexistent/ckpt", "--benchmark", "b.jsonl"), "--load"),
    (("tools/convert_checkpoint.py", "megatron-to-hf", "--checkpoint", "/nonexistent/ckpt",
      "--out", "/nonexistent/hf"), "--checkpoint"),
    (("tools/convert_checkpoint.py", "megatron-to-megatron-lm", "--checkpoint",
      "/nonexistent/ckpt", "--out", "/nonexistent/mlm"), "--checkpoint"),
])
def test_a_missing_checkpoint_is_named_by_the_flag_given(args, flag, tmp_path):
    bench = tmp_path / "b.jsonl"
    bench.write_text('{"question": "1+1?", "answer": "2"}\n')
    line = one_line_error(run(*(str(bench) if a == "b.jsonl" else a for a in args)))
    assert line.startswith(f"error: {flag}='/nonexistent/ckpt' is not a checkpoint"), line
    assert "train.load" not in line


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_evaluate_refuses_a_limit_below_one(limit, tmp_path):
    line = one_line_error(run("tools/evaluate.py", "--load", str(tmp_path), "--benchmark",
                              str(tmp_path / "b.jsonl"), "--limit", limit))
    assert line == (f"error: --limit={limit} (allowed: an integer >= 1; leave it out for all "
                    "items)")


@pytest.mark.parametrize("command, source", [("megatron-to-megatron-lm", "--checkpoint"),
                                             ("megatron-to-hf", "--checkpoint"),
                                             ("hf-to-megatron", "--hf-dir")])
def test_conversions_refuse_a_non_empty_out(command, source, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("not ours")
    line = one_line_error(run("tools/convert_checkpoint.py", command, source,
                              str(tmp_path / "src"), "--out", str(tmp_path / "out")))
    assert line == (f"error: --out={tmp_path / 'out'} is not empty (allowed: a new or empty "
                    "directory, or add --overwrite to write into it)")
    assert (tmp_path / "out" / "keep.txt").read_text() == "not ours"


def test_packed_attention_bench_refuses_a_window_beyond_memory(tmp_path):
    """--window 100000: [sequences, S, S] masks and scores of thousands of GiB. Refused with
    the size it would need, before the model is built, instead of dying for memory."""
    line = one_line_error(run("tools/bench_packed_attention.py", "--window", "100000",
                              "--out", str(tmp_path / "pa.json")))
    assert line.startswith("error: --window=100000 needs ~") and "GiB free" in line, line
    assert "allowed: a smaller --window" in line and not (tmp_path / "pa.json").exists()


@pytest.mark.parametrize("pattern, layout, mamba", [
    ("*-*-", "hybrid", False), ("M*-", "hybrid", True), ("*-|*-", "gpt", False)])
def test_megatron_lm_flags_are_only_what_applies_and_shell_safe(pattern, layout, mamba):
    from megatron_rlp.config import ModelConfig
    from megatron_rlp.interop.megatron_lm_export import megatron_lm_argv

    model = ModelConfig(hybrid_layer_pattern=pattern, hidden_size=64, mamba_head_dim=16)
    argv = megatron_lm_argv(model, 256, gpt=layout == "gpt")
    assert any(a.startswith("--mamba-") for a in argv) == mamba
    assert ("--hybrid-layer-pattern" in argv) == (layout == "hybrid")
    assert shlex.split(shlex.join(argv)) == argv  # what convert_checkpoint.py prints
    if layout == "hybrid":
        assert f"--hybrid-layer-pattern '{pattern}'" in shlex.join(argv)  # `*` is not globbed


def test_megatron_lm_example_help_exits_zero():
    proc = run("examples/megatron_lm/pretrain_gpt_rlp.py", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--rlp-group-size" in proc.stdout
    # megatron-core's own help text with its bare "%", shown as written
    assert "10%)" in proc.stdout and "10%%" not in proc.stdout


def test_megatron_lm_export_refuses_a_negative_iteration(tmp_path):
    line = one_line_error(run("tools/convert_checkpoint.py", "megatron-to-megatron-lm",
                              "--checkpoint", "/nonexistent/ckpt", "--out", str(tmp_path / "o"),
                              "--iteration", "-1"))
    assert "--iteration=-1" in line and ">= 0" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [None, "not json", '{"warmup": {}}'])
def test_compare_table_of_a_missing_or_foreign_file_is_one_line(content, tmp_path):
    path = tmp_path / "compare.json"
    if content is not None:
        path.write_text(content)
    line = one_line_error(run("tools/compare_rlp_ntp.py", "--table", str(path)))
    assert f"--table={path}" in line


def test_a_config_error_comes_alone(tmp_path):
    """Validation imports Megatron (window lengths here): its import-time notices must not
    precede the one-line error."""
    line = one_line_error(run("pretrain_rlp.py", "--config", "examples/configs/tiny_cpu.yaml",
                              "rlp.positions_per_document=4", "model.max_sequence_length=240"))
    assert "model.max_sequence_length=240" in line and "longest document window" in line
