"""megatron_dflash: DFlash block-diffusion drafters trained with megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron_dflash",
    version="0.1.0",
    description="Train DFlash speculative-decoding drafters for large targets with megatron-core",
    packages=find_packages(include=["megatron_dflash", "megatron_dflash.*"]),
    python_requires=">=3.12,<3.13",
    install_requires=[
        "torch==2.11.0",
        "megatron-core==0.19.2",
        "transformers==5.24.0",
        "safetensors",
        "sentencepiece",
        "gguf",
        "accelerate",
        "tensorboard",
        "psutil",  # megatron dist_checkpointing's async filesystem writer needs it
    ],
    extras_require={
        # Transformer Engine: GPU-only; installed from wheels on the GPU machine.
        "te": ["transformer-engine[pytorch]==2.20.2"],
        # flash-linear-attention: the GPU (Triton) kernels of megatron's GatedDeltaNet, for
        # Qwen3-Next/3.5 targets; on a CPU the package runs transformers' torch path instead.
        "gdn": ["flash-linear-attention==0.6.0"],
        "test": ["pytest", "pytest-xdist", "chitchat-dataset==0.9.0"],
    },
)
