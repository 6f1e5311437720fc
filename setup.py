"""megatron_ease: EASE (Evidence-Anchored Spatial Attention) supervision for DAPO on Qwen-VL,
built on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_ease",
    version="0.1.0",
    description="Evidence-anchored attention supervision for multimodal RLVR (DAPO) on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ease", "megatron_ease.*"]),
    install_requires=[
        # Ranges we use; constraints.txt pins the exact versions CI tests.
        "torch>=2.4,<2.15",
        "megatron-core>=0.16.1",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "webdataset>=0.2.86",
        "wandb>=0.17",
        "tokenizers>=0.20",
        "pillow>=10",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "psutil>=5.9",
        "matplotlib>=3.8",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "triton>=3.0"],
    },
)
