"""The checkpoint directory protocol under `train.save`: names, the `latest` pointer, fsync,
publishing a finished save (tmp + rename, `latest` replaced last), pruning, and resolving
what a user points `train.load` (or a tool's flag) at.

    step_00000020/     a complete checkpoint (dist_checkpointing format, + integrity.json)
    latest             name of the newest complete checkpoint (replaced last, atomically)
    .tmp_step_*/       a save in progress (or killed); never read, removed by the next save

Own code, not Megatron's: megatron-core's `dist_checkpointing.save` writes one directory; a
series of checkpoints with an atomic commit point and pruning is not part of it (Megatron-LM's
tracker file lives in megatron/training/checkpointing.py, outside megatron-core).
Megatron-LM saves are recognised through `interop.megatron_lm.find`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from megatron_rlp.checkpoint.errors import CheckpointError, on_rank0, reason
from megatron_rlp.interop import megatron_lm

LATEST = "latest"
INTEGRITY = "integrity.json"
_NAME = re.compile(r"^step_(\d{8,})$")


def step_name(step: int) -> str:
    """The directory name of the checkpoint of `step`: step_00000020."""
    return f"step_{step:08d}"


def check_writable(root: str) -> None:
    """Collective: fail now, before any training, if checkpoints could not be written."""
    def probe():
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        test = path / f".write_test_{os.getpid()}"
        test.write_bytes(b"ok")
        test.unlink()

    on_rank0(probe, f"train.save={root!r} is not a writable directory")


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `root/latest` names, if any (no validation)."""
    pointer = Path(root) / LATEST
    try:
        return Path(root) / pointer.read_text().strip()
    except OSError:
        return None


def _dir_bytes(path: Path | None) -> int:
    if path is None or not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def _remove(path: Path) -> None:
    """Rename out of sight first: a half-deleted `step_*` must never look like a checkpoint."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prepare_save(root: Path, tmp: Path, previous: Path | None) -> None:
    """Rank 0 only: create `root` and the empty `tmp` save dir, after removing what killed
    saves and prunes left; refuse (ENOSPC) when the disk has less room than `previous`."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_step_*"):  # left by a killed save
        shutil.rmtree(stale)
    for stale in root.glob(".trash_*"):
        shutil.rmtree(stale, ignore_errors=True)
    need, free = _dir_bytes(previous), shutil.disk_usage(root).free
    if need > free:
        raise OSError(errno.ENOSPC, f"No space left on device: the checkpoint needs "
                      f"about {need >> 20} MiB (like the last one), {free >> 20} MiB free")
    tmp.mkdir()


def publish(root: Path, tmp: Path, step: int, keep_last: int) -> None:
    """Rank 0 only, after every rank wrote `tmp`: fsync it, rename it to its step name,
    replace `latest` atomically (the commit point), then remove all but the `keep_last`
    newest earlier checkpoints (0 = keep all)."""
    name = step_name(step)
    final = root / name
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # a stale save of the same step (e.g. from an earlier run)
        _remove(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync(root)
    os.replace(pointer, root / LATEST)  # the commit point
    _fsync(root)
    if keep_last:  # older steps only: later ones belong to another (abandoned) run
        older = [c for s, c in _checkpoints(root) if s < step]
        for old in older[:max(len(older) - (keep_last - 1), 0)]:
            _remove(old)


def megatron_lm_dir(path: str | Path) -> Path | None:
    """The iteration dir of a Megatron-LM save (interop/megatron_lm.py), else None."""
    try:
        return megatron_lm.find(path)
    except megatron_lm.MegatronLMError as e:
        raise CheckpointError(str(e)) from None


def holds_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds anything `resolve_checkpoint` would read (a `latest` pointer, a
    checkpoint's metadata.json, a step_* directory, a Megatron-LM tracker or iteration dir).
    False for a missing or empty directory, or one with only logs: Megatron-LM's
    `--save X --load X` idiom starts from scratch there (train/loop.py)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / LATEST).exists() or (p / "metadata.json").exists() or _checkpoints(p):
        return True
    try:
        return megatron_lm_dir(p) is not None
    except CheckpointError:  # a broken Megatron-LM save: resolve_checkpoint says what is wrong
        return True


def resolve_checkpoint(path: str, flag: str = "train.load") -> Path:
    """`path` is a checkpoint directory or a `train.save` root with a `latest` pointer, or a
    Megatron-LM save (its tracker file) or `iter_*` directory. `flag`: what the user set it
    with, as errors name it (a tool's `--load`, `--checkpoint`).

    Raises:
        CheckpointError: nothing usable there (missing, empty, incomplete or bad pointer).
    """
    if (mlm := megatron_lm_dir(path)) is not None:
        return mlm
    p = Path(path)
    pointer = p / LATEST
    if pointer.exists():
        try:
            raw = pointer.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read {pointer}: {reason(e)}") from None
        name = raw.decode("utf-8", errors="replace").strip()
        if not _NAME.match(name):
            raise CheckpointError(f"{pointer} is corrupted (expected a name like step_00000020, "
                                  f"found {raw[:40]!r})")
        ckpt = p / name
        if not ckpt.is_dir():
            raise CheckpointError(f"{pointer} names {name}, which does not exist in {p}")
    elif (p / "metadata.json").is_file():
        ckpt = p
    else:
        complete = [c for _, c in _checkpoints(p) if (c / "metadata.json").is_file()] \
            if p.is_dir() else []
        if not complete:
            hint = ""
            if (p / "config.json").is_file():  # a Hugging Face model directory
                out = f"{str(path).rstrip('/')}-megatron"
                hint = (f"; it looks like a Hugging Face model: convert it first with "
                        f"`python tools/convert_checkpoint.py hf-to-megatron --hf-dir {path} "
                        f"--out {out}`, then {flag}={out}")
            raise CheckpointError(f"{flag}={path!r} is not a checkpoint (no '{LATEST}' "
                                  f"pointer, no metadata.json, no step_* checkpoint){hint}")
        ckpt = complete[-1]  # saved, but killed before `latest` was first written
    if not (ckpt / "metadata.json").is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or corrupted (no metadata.json)")
    return ckpt
