# megatron-rlp for GPU clusters (docker, or enroot/pyxis on SLURM).
#
# Base: NGC PyTorch 26.08 (Ubuntu 24.04, Python 3.12, CUDA 13, with PyTorch, Transformer
# Engine, Apex, NCCL, cuDNN, Triton and TensorBoard built by NVIDIA) -- the release
# Megatron-LM's own development image uses. Added here: the Mamba-2 kernels (mamba-ssm,
# causal-conv1d, compiled against the image's torch), megatron-core 0.19.2 and this
# package. Never `pip install` torch, transformer-engine or apex on top: --no-deps where
# a package would pull them, and the image's pip constraints (PIP_CONSTRAINT) stay on.
#
#   docker build -t megatron-rlp:0.1.0 .
#   docker run --gpus all --rm megatron-rlp:0.1.0                 # pretrain_rlp.py --help
#   docker run --gpus all --rm -v /data:/data -e DATA=/data/text.jsonl -e TOKENIZER=... \
#       -e SAVE_DIR=/data/run -e LOAD=/data/base megatron-rlp:0.1.0 bash examples/qwen3_1p7b.sh
#   enroot import -o megatron-rlp.sqsh dockerd://megatron-rlp:0.1.0   # for pyxis:
#   CONTAINER_IMAGE=$PWD/megatron-rlp.sqsh MODEL=... sbatch examples/slurm/rlp_multinode.sbatch
FROM nvcr.io/nvidia/pytorch:26.08-py3

LABEL org.opencontainers.image.title="megatron-rlp" \
      org.opencontainers.image.description="RLP (reinforcement learning as a pretraining objective) on Megatron-Core" \
      org.opencontainers.image.version="0.1.0"

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# Mamba-2 kernels, compiled for Hopper (add 8.0 for A100, 10.0 for B200). FORCE_BUILD skips
# their setup's prebuilt-wheel download, which does not match the image's torch build.
ARG TORCH_CUDA_ARCH_LIST="9.0"
ARG MAX_JOBS=8
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
    CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    pip install --no-cache-dir --no-build-isolation \
        causal-conv1d==1.7.0 \
        mamba-ssm==2.3.2.post1

# Megatron-Core (its own dependencies, torch/numpy/packaging, come with the base) and this
# package's pure-Python dependencies (setup.py install_requires minus torch/numpy).
RUN pip install --no-cache-dir --no-deps megatron-core==0.19.2 && \
    pip install --no-cache-dir \
        pyyaml==6.0.3 \
        einops==0.8.2 \
        psutil==7.2.2 \
        tokenizers==0.22.1

# The package itself, editable so that a checkout mounted over it (CONTAINER_CODE=mount)
# or a `git pull` inside a derived image needs no reinstall.
WORKDIR /workspace/megatron-rlp
COPY . /workspace/megatron-rlp
# (No GPU while building: check the CUDA packages are there, import only the pure-Python ones.)
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . && \
    python -c "import importlib.util as u, megatron.core, megatron_rlp.config; \
missing = [m for m in ('mamba_ssm', 'causal_conv1d', 'transformer_engine', 'apex') \
           if u.find_spec(m) is None]; assert not missing, missing"

# The NGC entrypoint (driver checks, banner) runs the command; by default the CLI's help.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh"]
CMD ["python", "pretrain_rlp.py", "--help"]
