"""Bad input and failing disks: each case ends the run with one `error:` line on stderr, a
non-zero exit code and no traceback, and loses nothing (the checkpoint directory is byte for
byte what it was, and still resumes).

Most cases run `pretrain_rlp.main` in this process (checkpoint_helpers.py); the last two run
the real CLI in a fresh interpreter to show that nothing else reaches stderr there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.checkpoint_helpers import CONFIG, ROOT, SMALL, latest, main, ok


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(run, code: int, *needles: str) -> str:
    lines = run.err.strip().splitlines()
    assert run.rc == code, (run.rc, run.out[-1500:], run.err[-1500:])
    assert len(lines) == 1 and "Traceback" not in run.err, run.err
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A `train.save` root holding one complete checkpoint of step 2."""
    root = tmp_path_factory.mktemp("good") / "ckpt"
    ok("train.steps=2", f"train.save={root}")
    return root


@pytest.fixture
def ckpt(good, tmp_path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(good, root)
    return root


def _shard(root: Path) -> Path:
    return next(latest(root).glob("*.distcp"))


def _truncate(root: Path) -> None:
    shard = _shard(root)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _flip(root: Path) -> None:
    shard = _shard(root)
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    shard.write_bytes(bytes(data))


DAMAGE = {
    # name: (damage, extra overrides, substrings of the error line)
    # (train.load = train.save with nothing there is Megatron-LM's --save X --load X: from
    # scratch, tests/e2e/test_resume_options.py; a load path of its own must hold a checkpoint)
    "empty-dir": (lambda r: [shutil.rmtree(r), r.mkdir()], ("train.save=null",),
                  ("is not a checkpoint",)),
    "latest-garbage": (lambda r: (r / "latest").write_bytes(b"\x00\xffjunk"), (),
                       ("latest is corrupted",)),
    "latest-names-missing": (lambda r: (r / "latest").write_text("step_00000009\n"), (),
                             ("names step_00000009, which does not exist",)),
    "no-metadata-json": (lambda r: (latest(r) / "metadata.json").unlink(), (),
                         ("incomplete or corrupted (no metadata.json)",)),
    "truncated-shard": (_truncate, (), ("is corrupted (its files do not match integrity.json)",
                                        "__0_0.distcp")),
    "flipped-bytes": (_flip, (), ("is corrupted (its files do not match integrity.json)",)),
    "truncated-shard-no-checksums": (_truncate, ("train.checkpoint_checksums=false",),
                                     ("cannot",)),
    "garbage-dcp-metadata": (lambda r: (latest(r) / ".metadata").write_bytes(b"garbage" * 9),
                             ("train.checkpoint_checksums=false",),
                             ("cannot read checkpoint", "(truncated or corrupted?)")),
    "other-model-shape": (lambda r: None, ("model.hidden_size=96",),
                          ("does not fit the configured model: hidden_size=64 (config: 96)",)),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_bad_checkpoint_is_one_line_and_loses_nothing(ckpt, tmp_path, case):
    damage, extra, needles = DAMAGE[case]
    damage(ckpt)
    before = snapshot(ckpt)
    run = main("train.steps=4", f"train.load={ckpt}", f"train.save={ckpt}", *extra)
    assert_one_line_error(run, 2, *needles)
    assert snapshot(ckpt) == before
    assert "[rlp step" not in run.out  # failed before any training


@pytest.mark.parametrize("case, content, needle", [
    ("missing", None, "data.corpus="),
    ("directory", "DIR", "data.corpus="),
    ("binary", b"\x00\x9f\x92\x96\xff" * 200, "data.corpus="),
    ("json-without-text", b'{"body": "hello"}\n', 'expected an object with a string "text"'),
])
def test_bad_data_is_one_line(tmp_path, case, content, needle):
    path = tmp_path / "corpus.jsonl"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    run = main("train.steps=2", f"data.corpus={path}", f"train.save={tmp_path / 'ckpt'}")
    assert_one_line_error(run, 2, needle)
    assert not (tmp_path / "ckpt" / "latest").exists()


def test_unwritable_save_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run = main("train.steps=2", f"train.save={blocker / 'ckpt'}")
    assert_one_line_error(run, 2, "is not a writable directory")
    assert "[rlp step" not in run.out
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        run = main("train.steps=2", f"train.save={locked / 'ckpt'}")
        assert_one_line_error(run, 2, "is not a writable directory", "Permission denied")


def test_disk_full_during_save_keeps_the_last_checkpoint(tmp_path):
    """The writer fails with ENOSPC after part of checkpoint 2 is on disk (test hook inside
    Megatron's file writer): one line, the partial save is removed, checkpoint 1 stays
    `latest`, unchanged, and resumes."""
    root = tmp_path / "ckpt"
    run = main("train.steps=3", "train.save_interval=1", f"train.save={root}",
               faults="save_enospc@2")
    line = assert_one_line_error(run, 2, "No space left on device [errno 28]",
                                 "step_00000002", "the last checkpoint is unchanged")
    assert "step_00000001" in line
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    before = snapshot(root)
    resumed = ok("train.steps=2", f"train.load={root}")
    assert "resumed" in resumed.out and snapshot(root) == before


def test_too_little_free_space_fails_before_writing(tmp_path, monkeypatch):
    """With a previous checkpoint to measure, a save that cannot fit is refused up front."""
    root = tmp_path / "ckpt"
    ok("train.steps=1", f"train.save={root}")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1 << 20))  # 1 MiB free
    run = main("train.steps=2", f"train.load={root}", f"train.save={root}")
    assert_one_line_error(run, 2, "No space left on device", "MiB free",
                          "the last checkpoint is unchanged")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI, one process (no launcher), with no torch.distributed variables that an
    in-process test may have left behind."""
    clean = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    return subprocess.run([sys.executable, "pretrain_rlp.py", "--config", CONFIG, *SMALL, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**clean, **(env or {})})


def test_cli_corrupted_checkpoint_is_exactly_one_line(ckpt):
    _flip(ckpt)
    proc = cli("train.steps=3", f"train.load={ckpt}")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: checkpoint "), \
        proc.stderr


def test_cli_disk_full_is_exactly_one_line(tmp_path):
    proc = cli("train.steps=2", "train.save_interval=1", f"train.save={tmp_path}",
               env={"MEGATRON_RLP_FAULTS": "save_enospc@2"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "No space left on device" in proc.stderr, \
        proc.stderr
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
