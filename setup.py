"""pipetune: pipeline-parallel full fine-tuning of BLOOM and LLaMA on DeepSpeed.

Versions are pinned to the ones tested together (CPU: torch 2.13.0+cpu; see README for GPUs).
"""
from setuptools import find_packages, setup

HF_DATA = ["datasets==5.2.0", "pyarrow==26.0.1"]

setup(
    name="pipetune",
    version="0.1.0",
    description="Pipeline-parallel full fine-tuning (SFT, reward model, PPO) of BLOOM and LLaMA on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["models", "models.*", "data", "data.*", "trainer", "trainer.*", "convert", "convert.*",
                                    "compat", "compat.*", "inference", "inference.*"]),
    py_modules=["train_ds", "rlhf", "convert_model", "demo"],
    package_data={"data": ["samples/*.json", "samples/*.jsonl", "samples/*.parquet"]},
    install_requires=[
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "transformers==5.23.0",
        "tokenizers==0.23.3",
        "sentencepiece==0.2.3",
        "protobuf==7.36.2",
        "lion-pytorch==0.2.5",
        "safetensors==0.8.0",
        "tqdm==4.70.1",
        "Jinja2==3.1.6",
        "numpy==2.4.6",
        "matplotlib==3.11.2",
    ],
    # "hf": reading .parquet files and datasets' save_to_disk folders (imported only for such files).
    extras_require={"hf": HF_DATA, "test": ["pytest==9.2.0", *HF_DATA]},
)
