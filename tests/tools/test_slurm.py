"""The sbatch scripts on a real SLURM: Debian's slurm-wlm and munge, started here for one
node with 2 CPUs (munged, slurmctld, slurmd in a temporary folder, free ports, no
accounting, no cgroups), then `sbatch` as a user would.

`.ci/run` installs the packages (apt-get install slurm-wlm munge); without them the tests
skip, saying so. The daemons run as root (slurmd must), so does the job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo", "srun")


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _missing() -> list[str]:
    return [d for d in DAEMONS if not _which(d)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """munged + slurmctld + slurmd for one node, all under `base`, stopped by `stop()`."""

    def __init__(self, base: Path, cpus: int = 2):
        self.base = base
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.cpus = cpus

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.base / f"{name}.stdout", "w")  # noqa: SIM115 - owned by the process
        self.procs.append(subprocess.Popen([_which(name), *args], stdout=log,
                                           stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self) -> None:
        b = self.base
        munge = b / "munge"
        for d in (munge, b / "state", b / "spool", b / "log"):
            d.mkdir(parents=True)
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        sock = munge / "munge.sock"
        self._spawn("munged", "--foreground", "--force", f"--socket={sock}",
                    f"--key-file={key}", f"--log-file={munge / 'munged.log'}",
                    f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'seed'}")
        ctl, node = _free_port(), _free_port()
        self.conf.write_text(f"""\
ClusterName=rlptest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctl}
SlurmdPort={node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={b / 'state'}
SlurmdSpoolDir={b / 'spool'}
SlurmctldPidFile={b / 'slurmctld.pid'}
SlurmdPidFile={b / 'slurmd.pid'}
SlurmctldLogFile={b / 'log' / 'slurmctld.log'}
SlurmdLogFile={b / 'log' / 'slurmd.log'}
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        self._wait(lambda: sock.exists(), "munged socket", 20)
        self._spawn("slurmctld", "-D", "-c", "-f", str(self.conf))
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0,
                   "slurmctld", 30)
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.host)
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
                   .startswith("idle"), "slurmd (node idle)", 30)

    def _wait(self, ok, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.3)
        raise RuntimeError(f"{what} did not come up (exited: {dead}); logs:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted(self.base.rglob("*.log")) + sorted(self.base.glob("*.stdout")):
            out.append(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace")
                                                      .splitlines()[-15:]))
        return "\n".join(out)

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([_which(cmd[0]), *cmd[1:]], env=kw.pop("env", self.env),
                              capture_output=True, text=True, timeout=60, **kw)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        proc = self.run("sbatch", "--parsable", *args, cwd=ROOT, env={**self.env, **(env or {})})
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                        "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"):
                return info
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} still {self.job(job_id).get('JobState')} after "
                             f"{timeout}s\n{self.logs()}")

    def stop(self) -> None:
        self.run("scancel", "--user", "root", check=False)
        for p in reversed(self.procs):  # only the daemons this fixture started
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = _missing()
    if missing:
        pytest.skip(f"SLURM/munge not installed (missing {', '.join(missing)}): "
                    "apt-get install slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs; run the tests as root")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


def test_tiny_cpu_sbatch_trains_and_logs_rlp_metrics(cluster, tmp_path):
    """The user's command: `sbatch examples/slurm/tiny_cpu.sbatch <overrides>`."""
    out = tmp_path / "job.out"
    run_dir = tmp_path / "run"
    job = cluster.sbatch(f"--output={out}", "examples/slurm/tiny_cpu.sbatch",
                         "train.steps=3", "device.num_threads=1",
                         env={"RUN_DIR": str(run_dir)})
    info = cluster.wait_job(job, timeout=150)
    text = out.read_text() if out.exists() else "(no output file)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info.get('JobState')} {info.get('ExitCode')}\n{text[-4000:]}\n{cluster.logs()}"
    assert f"[slurm] job {job}" in text
    steps = re.findall(r"^\[rlp step +(\d+)\] loss [-+]\d\.\d{4} \| reward [-+]\d", text, re.M)
    assert steps == ["1", "2", "3"], text[-4000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"reward_mean", "loss", "clip_fraction", "thought_len"} <= rows[-1].keys()


PROBE = """\
import os, signal, sys, time
rank = os.environ["RANK"]
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
print(f"probe rank {rank} ready", flush=True)
open(os.path.join(sys.argv[1], f"ready.{rank}"), "w").close()
end = time.time() + 90
while not got and time.time() < end:
    time.sleep(0.1)
# Like the trainer's StopGuard: a stop request comes twice (slurmstepd signals every process
# of the step, and the launcher forwards it), so ignore the rest once it has arrived.
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
print(f"probe rank {rank} got SIGUSR1: {bool(got)}", flush=True)
sys.exit(0 if got else 3)
"""

PROBE_SBATCH = """\
#!/bin/bash
#SBATCH --nodes=1 --ntasks=1 --cpus-per-task=2 --time=00:05:00
#SBATCH --signal=B:USR1@120
set -euo pipefail
cd "$RLP_ROOT"
source examples/slurm/common.sh
rlp_run self srun --ntasks=1 bash -c 'source examples/slurm/common.sh; export NNODES=1 \
NPROC_PER_NODE=2; rlp_torchrun_args; rlp_launch "${RLP_TORCHRUN[@]}" "$PROBE" "$PROBE_DIR"'
echo "batch done"
"""


def test_usr1_reaches_every_trainer_and_torchrun_survives(cluster, tmp_path):
    """`--signal=B:USR1@120` goes to the batch shell only: the helpers' chain (batch shell ->
    srun -> the node's launcher -> torchrun's trainers) must deliver it to every rank while
    torchrun (which USR1 would kill) lives on to collect their exit codes."""
    probe, script, out = tmp_path / "probe.py", tmp_path / "probe.sbatch", tmp_path / "p.out"
    probe.write_text(PROBE)
    script.write_text(PROBE_SBATCH)
    job = cluster.sbatch(f"--output={out}", str(script),
                         env={"RLP_ROOT": str(ROOT), "PROBE": str(probe),
                              "PROBE_DIR": str(tmp_path)})
    end = time.monotonic() + 60
    while not all((tmp_path / f"ready.{r}").exists() for r in (0, 1)):
        assert time.monotonic() < end, (out.read_text() if out.exists() else "") + \
            cluster.logs()
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            out.read_text() if out.exists() else cluster.job(job)
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = cluster.wait_job(job, timeout=60)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')}\n{text}"
    assert "forwarding SIGUSR1" in text, text
    assert "probe rank 0 got SIGUSR1: True" in text and "probe rank 1 got SIGUSR1: True" in text
    assert "batch done" in text, text


def test_preemption_signal_saves_and_ends_the_job_cleanly(cluster, tmp_path):
    """`--signal=B:USR1@120` as SLURM sends it before a time limit, here on demand: the tiny
    job stops at a step boundary, saves a checkpoint and the job ends COMPLETED."""
    assert (ROOT / "megatron_rlp/train/signals.py").is_file(), "the stop-signal handling is gone"
    out, save = tmp_path / "job.out", tmp_path / "ckpt"
    job = cluster.sbatch(f"--output={out}", "examples/slurm/tiny_cpu.sbatch",
                         "train.steps=500", "device.num_threads=1",
                         env={"RUN_DIR": str(tmp_path / "run"), "SAVE_DIR": str(save)})
    end = time.monotonic() + 120
    while "[rlp step     2]" not in (out.read_text() if out.exists() else ""):
        info = cluster.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            (out.read_text() if out.exists() else "") + str(info)
        assert time.monotonic() < end, "no training step within 120 s"
        time.sleep(0.3)
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = cluster.wait_job(job, timeout=90)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info.get('JobState')} {info.get('ExitCode')}\n{text[-4000:]}"
    assert "forwarding SIGUSR1" in text and "[stop]" in text, text[-4000:]
    last = int(re.findall(r"^\[rlp step +(\d+)\]", text, re.M)[-1])
    assert 2 <= last < 500
    assert (save / "latest").read_text().strip() == f"step_{last:08d}"


def _multinode_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    data, ckpt = tmp_path / "data" / "text.jsonl", tmp_path / "base"
    data.parent.mkdir()
    data.write_text('{"text": "hello"}\n')
    ckpt.mkdir()
    return {"MODEL": "qwen3_1p7b", "DATA": str(data), "LOAD": str(ckpt),
            "TOKENIZER": str(ROOT / "tests/assets/tiny_bpe/tokenizer.json"),
            "SAVE_DIR": str(tmp_path / "save"), "CONFIG": "examples/configs/tiny_cpu.yaml",
            "DRY_RUN": "1", "ESTIMATE": "0", **extra}


def test_multinode_sbatch_builds_the_rendezvous_on_the_first_node(cluster, tmp_path):
    """rlp_multinode.sbatch as written (one node here, no GPUs: --gpus-per-node=0), with
    the launch script in DRY_RUN mode: srun runs it per node, which prints its torchrun."""
    out = tmp_path / "mn.out"
    job = cluster.sbatch("--gpus-per-node=0", "--nodes=1", f"--output={out}",
                         "examples/slurm/rlp_multinode.sbatch", "train.steps=3",
                         env=_multinode_env(tmp_path))
    info = cluster.wait_job(job, timeout=60)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text
    torchrun = [line for line in text.splitlines() if "torchrun" in line]
    assert len(torchrun) == 1, text
    assert (f"--nproc-per-node 8 --nnodes 1 --rdzv-backend c10d --rdzv-endpoint "
            f"{cluster.host}:29500 --rdzv-id {job} pretrain_rlp.py") in torchrun[0]
    assert torchrun[0].rstrip().endswith("train.steps=3")
    assert (tmp_path / "save").is_dir()


def test_multinode_sbatch_container_flags(cluster, tmp_path):
    """With CONTAINER_IMAGE, srun gets pyxis flags: the image, the code's workdir and the
    folders of the four paths mounted at the same place (srun is a stand-in printing its
    arguments: there is no pyxis here)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nprintf "srun-arg %s\\n" "$@"\n')
    (fake / "srun").chmod(0o755)
    out = tmp_path / "c.out"
    env = _multinode_env(tmp_path, CONTAINER_IMAGE="/images/rlp.sqsh",
                         CONTAINER_MOUNTS="/scratch:/scratch",
                         PATH=f"{fake}:{os.environ['PATH']}")
    job = cluster.sbatch("--gpus-per-node=0", "--nodes=1", f"--output={out}",
                         "examples/slurm/rlp_multinode.sbatch", env=env)
    assert cluster.wait_job(job, timeout=60)["JobState"] == "COMPLETED", out.read_text()
    args = [line.split(" ", 1)[1] for line in out.read_text().splitlines()
            if line.startswith("srun-arg ")]
    assert "--container-image=/images/rlp.sqsh" in args
    assert "--container-workdir=/workspace/megatron-rlp" in args
    mounts = next(a for a in args if a.startswith("--container-mounts=")).split("=", 1)[1]
    want = {f"{tmp_path / 'data'}:{tmp_path / 'data'}", f"{tmp_path / 'base'}:{tmp_path / 'base'}",
            f"{tmp_path / 'save'}:{tmp_path / 'save'}", "/scratch:/scratch",
            f"{ROOT / 'tests/assets/tiny_bpe'}:{ROOT / 'tests/assets/tiny_bpe'}"}
    assert set(mounts.split(",")) == want, mounts
    assert args[-2:] == ["bash", "examples/qwen3_1p7b.sh"]
