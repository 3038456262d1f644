"""One typed config for a run: dataclass sections, a YAML file, `section.key=value` overrides.

Validation happens here, before `torch.distributed` starts, so a bad value costs one line
naming the key, the value and what is allowed (`ConfigError`), never a traceback from deep
inside Megatron. Parallel sizes use Megatron's own key names.

- `errors`: `ConfigError` and the one-line check;
- `model`: the `model`, `parallel` and `precision` sections;
- `rlp`: the `rlp` section, with the window length and thought-template rules;
- `sections`: the `optimizer`, `data`, `train` and `device` sections;
- `run`: `RunConfig` and the pure rules across sections;
- `loading`: YAML and overrides -> a validated `RunConfig`;
- `launch`: world size and ranks from the launcher's environment.

The checks that need the machine or other parts of the package (Transformer Engine, CUDA,
FlexAttention, a Megatron-LM checkpoint's args) and the launcher glue are in
`megatron_rlp/startup.py`, which every entry point loads its config through.
"""

from megatron_rlp.config.errors import ConfigError
from megatron_rlp.config.launch import launch_env
from megatron_rlp.config.loading import load_config, read_config
from megatron_rlp.config.model import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_rlp.config.rlp import RLPConfig, max_window_tokens
from megatron_rlp.config.run import RunConfig, cascade_decode
from megatron_rlp.config.sections import DataConfig, DeviceConfig, OptimizerConfig, TrainConfig

__all__ = [
    "cascade_decode",
    "ConfigError",
    "DataConfig",
    "DeviceConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PrecisionConfig",
    "ParallelConfig",
    "RLPConfig",
    "RunConfig",
    "TrainConfig",
    "launch_env",
    "load_config",
    "max_window_tokens",
    "read_config",
]
