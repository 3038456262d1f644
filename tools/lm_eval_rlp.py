"""lm-eval's command line with the `megatron-rlp` model registered (lm-eval 0.4.x, the
`eval` extra). Everything after the script name is lm-eval's own arguments:

    HF_DATASETS_OFFLINE=1 python tools/lm_eval_rlp.py run --model megatron-rlp \
        --model_args load=runs/demo/ntp --include_path runs/tasks/lm_eval \
        --tasks rlp_heldout_gen,rlp_heldout_ll --output_path runs/eval/lm_eval

Under torchrun the model runs in any layout (`overrides=parallel.tensor_model_parallel_size=2`,
several overrides separated by spaces); requests are dealt over data-parallel ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    # Local task files only: never reach for the Hugging Face Hub at run time.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megatron_rlp.startup import quiet_megatron

    quiet_megatron(checkpoint=False)
    from lm_eval.__main__ import cli_evaluate

    import megatron_rlp.eval.lm_eval_adapter  # noqa: F401 - registers `megatron-rlp`

    cli_evaluate()


if __name__ == "__main__":
    main()
