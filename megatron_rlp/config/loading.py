"""Loading a run config: defaults, a YAML file, then `section.key=value` overrides, each value
coerced to its field's annotated type (unknown keys and wrong types are `ConfigError`s), then
the pure rules of `RunConfig.validate`.

Entry points load through `megatron_rlp.startup.load_config`, which adds what needs more than
the config: `train.use_checkpoint_args` (a Megatron-LM checkpoint's saved args) and the
machine checks (TE, CUDA capability, FlexAttention).
"""

from __future__ import annotations

import contextlib
import logging
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_rlp.config.errors import ConfigError
from megatron_rlp.config.run import RunConfig


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        # A YAML list, or one string split on whitespace (`data.blend="0.7 a 0.3 b"`); on the
        # command line also the YAML list form of the docs, `data.blend='[0.7, a, 0.3, b]'`.
        if isinstance(value, str) and value.lstrip().startswith("["):
            raw = value
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = None
            if not isinstance(value, list):
                raise ConfigError(
                    f"invalid config: {key}={raw!r} is cut off or not a YAML list (allowed: a "
                    "whole list; quote the whole override against the shell's word splitting, "
                    "e.g. 'data.blend=[0.7, A, 0.3, B]', or give it space-separated: "
                    "data.blend=\"0.7 A 0.3 B\")")
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a non-empty list or "
                              f"a space-separated string)")
        out = []
        for item in items:
            if isinstance(item, (dict, list, tuple)) or item is None:
                raise ConfigError(f"invalid config: {key}={value!r} (allowed: a list of scalars)")
            out += str(item).split()
        return out
    if origin is Literal:
        allowed = ", ".join(repr(a) for a in args)
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: one of {allowed})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: an integer)")
        try:
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value, 0)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, int):
                return value
        except ValueError:
            pass
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: an integer)")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a number)")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a number)") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a string)")
        return str(value)
    raise ConfigError(f"invalid config: {key} has unsupported type {tp}")


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(cfg: RunConfig, key: str, value: Any) -> None:
    """Set `section.key` on cfg from a raw value (YAML scalar or CLI string)."""
    parts = key.split(".")
    top = _section_types(RunConfig)
    if parts[0] not in top:
        raise ConfigError(f"invalid config: unknown section {parts[0]!r} in {key!r} "
                          f"(allowed: {', '.join(top)}){_did_you_mean(key)}")
    section = getattr(cfg, parts[0])
    hints = _section_types(type(section))
    if len(parts) == 1 and parts[0] == "device" and isinstance(value, str):
        parts = ["device", "type"]  # `device: cpu` is shorthand for `device.type: cpu`
    if len(parts) != 2:
        raise ConfigError(f"invalid config: {key!r} (allowed: section.key, e.g. rlp.group_size)")
    if parts[1] not in hints:
        guess = _did_you_mean(key)
        allowed = f"a key of {parts[0]}" if guess else ", ".join(hints)
        raise ConfigError(f"invalid config: unknown key {key!r} (allowed: {allowed}){guess}")
    setattr(section, parts[1], _coerce(value, hints[parts[1]], key))


def _did_you_mean(key: str) -> str:
    """"; did you mean rlp.group_size?" for the closest known `section.key`s (up to 2,
    closest first), or ""."""
    import difflib

    known = [f"{sec}.{k}" for sec, tp in _section_types(RunConfig).items()
             for k in _section_types(tp)]
    close = difflib.get_close_matches(key, known, n=2, cutoff=0.75)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _flatten(data: dict) -> list[tuple[str, Any]]:
    items = []
    for sec, body in data.items():
        if isinstance(body, dict):
            items += [(f"{sec}.{k}", v) for k, v in body.items()]
        else:
            items.append((str(sec), body))
    return items


ConfigPaths = str | Path | list[str] | tuple[str, ...] | None


def read_config(path: ConfigPaths = None, overrides: tuple[str, ...] = ()) -> RunConfig:
    """A RunConfig from defaults, optional YAML files and overrides, not yet validated.

    Args:
        path: YAML file with sections as top-level keys (any subset), or several, applied in
            order (later ones win, key by key: e.g. a run config, then the `model.yaml` that
            `tools/convert_checkpoint.py hf-to-megatron` writes).
        overrides: `section.key=value` strings, applied after the files.

    Raises:
        ConfigError: a missing or unreadable file, an unknown key, a value of the wrong type.
    """
    cfg = RunConfig()
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for path in paths:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"invalid config: {str(path)!r} is a directory "
                              f"(allowed: a YAML file, e.g. examples/configs/tiny_cpu.yaml)")
        if not p.is_file():
            raise ConfigError(f"invalid config: file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid config: {path} is not valid YAML ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0]})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"invalid config: {path} is not a UTF-8 text file (byte {e.start}: "
                              f"{e.reason}; allowed: a YAML file)") from None
        except OSError as e:
            raise ConfigError(f"invalid config: {path} cannot be read "
                              f"({e.strerror or e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config: {path} must map section names to settings")
        for key, value in _flatten(data):
            _apply(cfg, key, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"invalid override {item!r} (allowed: section.key=value)")
        key, value = item.split("=", 1)
        # Raw strings, not YAML: a pattern such as `*-*-` would read as a YAML alias.
        _apply(cfg, key.strip(), value.strip())
    return cfg


def load_config(path: ConfigPaths = None, overrides: tuple[str, ...] = (),
                world_size: int | None = None) -> RunConfig:
    """Build a RunConfig from defaults, an optional YAML file and overrides, and check it
    with the pure rules (`RunConfig.validate`). `megatron_rlp.startup.load_config` adds
    `train.use_checkpoint_args` and the machine checks.

    Args:
        path: YAML file(s), as `read_config` takes them.
        overrides: `section.key=value` strings, applied after the files.
        world_size: when known, also check divisibility by the data-parallel size.

    Raises:
        ConfigError: the first bad value (one line naming the key, the value, what is allowed).
    """
    cfg = read_config(path, overrides)
    # Validation may build a tokenizer (a thought template's length); its import-time notices
    # would come before a one-line config error.
    with quiet_imports():
        return cfg.validate(world_size)


@contextlib.contextmanager
def quiet_imports():
    """Warnings and torch's cpp_extension log notice silenced for the block."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)
