"""The launch scripts as users run them: shellcheck-clean, clear errors for missing paths,
the torchrun command they build (DRY_RUN=1), layouts that are valid and fit, the tiny CPU
script end to end (plus a plot of its metrics), and signal forwarding without SLURM."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.relative_to(ROOT) for p in [*ROOT.glob("examples/**/*.sh"),
                                               *ROOT.glob("examples/**/*.sbatch")])
# script -> (config, TP, G, rollout chunk, vocabulary of its tokenizer) as in its header
MODELS = {
    "qwen3_1p7b": ("examples/configs/qwen3_1p7b.yaml", 1, 16, 8, 151669),
    "nemotron_nano_12b_v2": ("examples/configs/nemotron_nano_12b_v2.yaml", 8, 16, 64, 131072),
    "nemotron_h_8b": ("examples/configs/nemotron_h_8b.yaml", 4, 16, 32, 131072),
    "qwen3_30b_a3b": ("examples/configs/qwen3_30b_a3b.yaml", 1, 16, 8, 151669),
    "nemotron_3_nano_30b_a3b": ("examples/configs/nemotron_3_nano_30b_a3b.yaml", 1, 16, 16,
                                131072),
}
# script -> (nodes of 8 GPUs, PP, EP) as in its header; the dense ones: 4 nodes, PP = EP = 1
MOE_LAYOUTS = {"qwen3_30b_a3b": (8, 2, 8), "nemotron_3_nano_30b_a3b": (8, 2, 8)}
TOKENIZER = "tests/assets/tiny_bpe/tokenizer.json"


def _recipes() -> dict[str, tuple[str, int]]:
    """Every examples/*.sh that launches a recipe (`rlp_paper_recipe CONFIG ...`): script ->
    (its config, the GPUs it is sized for: RECIPE_GPUS in the script, else the paper's 32)."""
    out = {}
    for path in sorted(ROOT.glob("examples/*.sh")):
        text = path.read_text()
        found = re.search(r"^\s*rlp_paper_recipe\s+(\S+)", text, re.M)
        if found:
            gpus = re.search(r"RECIPE_GPUS=\$\{RECIPE_GPUS:-(\d+)\}", text)
            out[path.stem] = (found.group(1), int(gpus.group(1)) if gpus else 32)
    return out


RECIPES = _recipes()
# what a launch script takes from the environment (where the data and checkpoints are)
PATH_KEYS = ("data.corpus", "data.tokenizer", "train.load", "train.save", "train.metrics_file",
             "train.tensorboard_dir")


def test_shellcheck_clean():
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck; .ci/run does)")
    assert len(SCRIPTS) >= 7, SCRIPTS
    proc = subprocess.run([sc, "-x", "--format=gcc", *map(str, SCRIPTS), ".ci/run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    data, ckpt = tmp_path / "text.jsonl", tmp_path / "base_ckpt"
    data.write_text('{"text": "hello"}\n')
    ckpt.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NNODES", "RLP_"))}
    env.update(DATA=str(data), TOKENIZER=TOKENIZER, SAVE_DIR=str(tmp_path / "save"),
               LOAD=str(ckpt), ESTIMATE="0", DRY_RUN="1")
    env.update(extra)
    return env


def _script(name: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"examples/{name}.sh", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", MODELS)
def test_missing_paths_are_named(name, tmp_path):
    env = _env(tmp_path, CONFIG=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    for var in ("DATA", "TOKENIZER", "SAVE_DIR", "LOAD"):
        env.pop(var)
    proc = _script(name, env)
    assert proc.returncode == 2 and proc.stdout == ""
    for var in ("DATA", "TOKENIZER", "SAVE_DIR", "LOAD"):
        assert f"error: {var} is not set" in proc.stderr, proc.stderr
    proc = _script(name, _env(tmp_path, CONFIG=str(ROOT / "examples/configs/tiny_cpu.yaml"),
                              DATA=str(tmp_path / "nothing")))
    assert proc.returncode == 2 and "DATA=" in proc.stderr and "indexed-dataset" in proc.stderr
    proc = _script(name, _env(tmp_path, CONFIG=str(tmp_path / "none.yaml")))
    assert proc.returncode == 2 and "none.yaml does not exist" in proc.stderr


def _command(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", MODELS)
def test_dry_run_builds_the_multinode_torchrun_command(name, tmp_path):
    _, tp, g, chunk, _ = MODELS[name]
    env = _env(tmp_path, CONFIG="examples/configs/tiny_cpu.yaml", NNODES="4",
               MASTER_ADDR="node001", SLURM_JOB_ID="4242")
    cmd = _command(_script(name, env, "train.steps=7", "rlp.temperature=0.5"))
    assert cmd[0].endswith("torchrun")
    flags = " ".join(cmd[:cmd.index("pretrain_rlp.py")])
    assert "--nproc-per-node 8 --nnodes 4 --rdzv-backend c10d" in flags
    assert "--rdzv-endpoint node001:29500 --rdzv-id 4242" in flags
    over = cmd[cmd.index("--config") + 2:]
    _, pp, ep = MOE_LAYOUTS.get(name, (4, 1, 1))
    for item in (f"parallel.tensor_model_parallel_size={tp}", f"rlp.group_size={g}",
                 f"parallel.pipeline_model_parallel_size={pp}",
                 f"rlp.rollout_chunk_contexts={chunk}",
                 "rlp.contexts_per_step=512", "rlp.max_thought_tokens=2048",
                 "device.type=cuda", "precision.params_dtype=bf16",
                 f"train.load={env['LOAD']}", f"data.corpus={env['DATA']}",
                 f"train.save={env['SAVE_DIR']}",
                 f"train.tensorboard_dir={env['SAVE_DIR']}/tensorboard"):
        assert item in over, (item, over)
    if ep > 1:
        assert f"parallel.expert_model_parallel_size={ep}" in over
    assert over[-2:] == ["train.steps=7", "rlp.temperature=0.5"]  # extra args come last

    # a SAVE_DIR holding a checkpoint is resumed instead of starting again from LOAD
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "latest").write_text("step_00000010\n")
    cmd = _command(_script(name, env))
    assert f"train.load={env['SAVE_DIR']}" in cmd


def test_single_node_runs_standalone(tmp_path):
    env = _env(tmp_path, CONFIG="examples/configs/tiny_cpu.yaml", GPUS_PER_NODE="4", TP="2")
    cmd = _command(_script("qwen3_1p7b", env))
    assert cmd[1:5] == ["--nproc-per-node", "4", "--standalone", "pretrain_rlp.py"]
    assert "parallel.tensor_model_parallel_size=2" in cmd


def _header_peak(name: str) -> float:
    text = (ROOT / f"examples/{name}.sh").read_text()
    return float(re.search(r"^#\s+peak\s+([\d.]+) of 80", text, re.M).group(1))


@pytest.mark.parametrize("name", MODELS)
def test_layout_is_valid_fits_and_matches_the_header(name, tmp_path):
    """With the real model config: the script's overrides pass the trainer's validation (and
    start-up checks) for its cluster (32 ranks; 64 for the MoE recipes), and the estimate
    fits 80 GiB and is the one documented in the header."""
    config, _, _, _, vocab = MODELS[name]
    assert (ROOT / config).is_file(), f"{config} is missing"
    nodes, pp, ep = MOE_LAYOUTS.get(name, (4, 1, 1))
    world = 8 * nodes
    env = _env(tmp_path, NNODES=str(nodes), MASTER_ADDR="node001")
    cmd = _command(_script(name, env))
    over = cmd[cmd.index("--config") + 2:]
    from megatron_rlp.config import load_config
    from megatron_rlp.startup import check_run_start

    cfg = load_config(str(ROOT / config), tuple(over), world_size=world)
    check_run_start(cfg)
    assert cfg.rlp.contexts_per_step == 512 and cfg.rlp.max_thought_tokens == 2048
    assert cfg.rlp.group_size == 16  # the paper's G, on every model
    p = cfg.parallel
    assert (p.pipeline_model_parallel_size, p.expert_model_parallel_size) == (pp, ep)
    proc = subprocess.run([sys.executable, "tools/estimate_memory.py", "--config", config,
                           "--world-size", str(world), "--vocab-size", str(vocab), "--json",
                           *over], cwd=ROOT, capture_output=True, text=True, timeout=120)
    est = json.loads(proc.stdout)
    assert est["fits"], est
    assert est["total"] / 2**30 == pytest.approx(_header_peak(name), abs=0.6)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_every_gpu_recipe_script_is_found():
    assert set(MODELS) <= set(RECIPES), RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_yaml_and_launch_script_describe_the_same_job(name, tmp_path):
    """Running the YAML directly and running its launch script (defaults, on the nodes the
    recipe is sized for) give the same config, but for the paths the script takes from the
    environment: same layout, G, rollout chunk, micro-batch, lengths, schedule."""
    from megatron_rlp.config import read_config

    config, gpus = RECIPES[name]
    env = _env(tmp_path, NNODES=str(gpus // 8), MASTER_ADDR="node001")
    cmd = _command(_script(name, env))
    assert cmd[cmd.index("--config") + 1] == config
    over = tuple(cmd[cmd.index("--config") + 2:])
    paths = tuple(o for o in over if o.split("=", 1)[0] in PATH_KEYS)
    assert len(paths) == len(PATH_KEYS), over
    direct = _flat(read_config(str(ROOT / config), paths).to_dict())
    launched = _flat(read_config(str(ROOT / config), over).to_dict())
    differ = {k: (direct[k], launched[k]) for k in direct if direct[k] != launched[k]}
    assert not differ, f"{config} vs examples/{name}.sh (yaml, script): {differ}"


@pytest.mark.parametrize("name", RECIPES)
def test_fewer_nodes_than_the_recipe_says_so(name, tmp_path):
    """On one node a 32-GPU recipe prints one note (stderr; the command stays the last line
    of stdout) naming its GPU count, this launch's, and what changes per rank; on its own
    node count it prints none."""
    config, gpus = RECIPES[name]
    proc = _script(name, _env(tmp_path, NNODES="1"))
    cmd = _command(proc)
    tp, pp = (int(next(o for o in cmd if o.startswith(f"parallel.{k}_model_parallel_size="))
                  .split("=")[1]) for k in ("tensor", "pipeline"))
    from megatron_rlp.config import read_config

    cfg = read_config(str(ROOT / config), tuple(cmd[cmd.index("--config") + 2:]))
    notes = [line for line in proc.stderr.splitlines() if line.startswith("[recipe] note:")]
    assert len(notes) == 1, proc.stderr
    dp, contexts = 8 // (tp * pp), cfg.rlp.contexts_per_step
    per_rank = contexts // dp
    for part in (f"sized for {gpus} GPUs", "this launch has 8 (NNODES=1)",
                 f"The same {contexts} contexts/step now run on DP={dp}",
                 f"{per_rank} contexts x G={cfg.rlp.group_size} = "
                 f"{per_rank * cfg.rlp.group_size} rollout rows per rank",
                 f"~{gpus // 8}x the time per step", f"CONTEXTS={contexts * 8 // gpus}"):
        assert part in notes[0], (part, notes[0])
    proc = _script(name, _env(tmp_path, NNODES=str(gpus // 8), MASTER_ADDR="node001"))
    assert proc.returncode == 0 and "[recipe]" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", ["examples/qwen3_30b_a3b.sh",
                                    "examples/nemotron_3_nano_30b_a3b.sh"])
def test_moe_recipe_layout(script):
    """The MoE recipes' YAML (the same job as the script: test_yaml_and_launch_script_...):
    G, rollout chunk and TP/PP/EP as the header states, valid for 64 ranks, each expert group
    within one node's 8 GPUs, the pipeline cut explicit (`|`), the launch script named."""
    name = Path(script).stem
    config, tp, g, chunk, _ = MODELS[name]
    nodes, pp, ep = MOE_LAYOUTS[name]
    assert RECIPES[name] == (config, 8 * nodes)
    from megatron_rlp.config import load_config

    cfg = load_config(str(ROOT / config), world_size=8 * nodes)
    p, r = cfg.parallel, cfg.rlp
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
            p.expert_model_parallel_size) == (tp, pp, ep)
    assert (r.contexts_per_step, r.group_size, r.rollout_chunk_contexts) == (512, g, chunk)
    assert tp * ep <= 8  # Megatron's rank order tp-cp-ep-dp-pp: an expert group in a node
    assert cfg.model.hybrid_layer_pattern.count("|") == pp - 1
    assert script in (ROOT / config).read_text()  # the YAML names its launch script


def test_tiny_cpu_script_trains_and_its_metrics_plot(tmp_path):
    """`bash examples/tiny_cpu.sh` for real (2 ranks on CPU), then the plot tool on its
    metrics."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env["RUN_DIR"] = str(run_dir)
    proc = subprocess.run(["bash", "examples/tiny_cpu.sh", "train.steps=3",
                           "device.num_threads=1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = re.findall(r"^\[rlp step +(\d+)\] loss ", proc.stdout, re.M)
    assert steps == ["1", "2", "3"], proc.stdout
    metrics = run_dir / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) == 3
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install '.[plot]')")
    out = tmp_path / "plot.png"
    plot = subprocess.run([sys.executable, "tools/plot_metrics.py", str(metrics), "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


PROBE = """\
import os, signal, sys, time
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda n, _: got.append(signal.Signals(n).name))
open(os.path.join(sys.argv[1], "ready." + os.environ["RANK"]), "w").close()
end = time.time() + 60
while not got and time.time() < end:
    time.sleep(0.05)
for sig in (signal.SIGUSR1, signal.SIGTERM):  # as the trainer's StopGuard: once is enough
    signal.signal(sig, signal.SIG_IGN)
# one write per line: the two ranks share the pipe, unbuffered
print(f"rank {os.environ['RANK']} {'got ' + got[0] if got else 'timed out'}", flush=True)
sys.exit(0 if got else 3)
"""


def _signal_job(tmp_path: Path, sig: signal.Signals, to: str) -> tuple[int, str]:
    """Two probe trainers under torchrun started by the launch helpers; `sig` goes to the
    launch shell (`to="shell"`) or to the torchrun agent alone (`to="torchrun"`)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    launcher = ('source examples/slurm/common.sh; export NNODES=1 NPROC_PER_NODE=2; '
                'rlp_torchrun_args; rlp_launch "${RLP_TORCHRUN[@]}" "$0" "$1"')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    proc = subprocess.Popen(["bash", "-c", launcher, str(probe), str(tmp_path)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        end = time.monotonic() + 60
        while not all((tmp_path / f"ready.{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < end, proc.stdout.read()
            time.sleep(0.05)
        target = proc.pid
        if to == "torchrun":
            kids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                    and _ppid(p) == proc.pid]
            assert len(kids) == 1, kids
            target = kids[0]
        os.kill(target, sig)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def _ppid(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_launcher_forwards_signals_to_the_trainers(tmp_path, sig):
    """Without SLURM: USR1 or TERM sent to the launch shell alone (a scheduler, `docker
    stop` of a container whose command is the script) reaches both trainers, and torchrun
    (whose default USR1 action is to die, and which exits 1 on its own SIGTERM) returns
    their exit code 0."""
    rc, out = _signal_job(tmp_path, sig, "shell")
    assert rc == 0, out
    assert f"forwarding {sig.name}" in out and f"rank 0 got {sig.name}" in out \
        and f"rank 1 got {sig.name}" in out, out


def test_sigterm_to_torchrun_itself_exits_1_after_the_trainers_stop(tmp_path):
    """What docs/reliability.md states for a SIGTERM sent to the torchrun agent (not through
    the launch shell): torchrun relays it to the trainers, which stop cleanly (exit 0: a real
    trainer saves first), and then torchrun exits 1 with its own SignalException report."""
    rc, out = _signal_job(tmp_path, signal.SIGTERM, "torchrun")
    assert "rank 0 got SIGTERM" in out and "rank 1 got SIGTERM" in out, out
    assert rc == 1 and "SignalException" in out, out


@pytest.mark.parametrize("name, env", [("qwen3_30b_a3b", {"EP": "7", "NNODES": "8"}),
                                       ("qwen3_1p7b", {"TP": "3", "NNODES": "4"})])
def test_dry_run_fails_on_a_refused_layout(name, env, tmp_path):
    """A dry run is the check before a launch: a layout the config refuses fails it, with the
    refusal's one line, instead of printing a command that would fail on the cluster."""
    proc = _script(name, _env(tmp_path, ESTIMATE="1", MASTER_ADDR="node001", **env))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "[estimate] error:" in proc.stdout and "pretrain_rlp.py" not in proc.stdout
    assert "error: dry run: the configuration is refused" in proc.stderr
