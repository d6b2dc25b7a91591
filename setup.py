from setuptools import find_packages, setup

setup(
    name="s2moe_ds",
    version="0.1.0",
    description="S2MoE and its sparse-MoE router family, trained under DeepSpeed",
    packages=find_packages(include=["s2moe_ds", "s2moe_ds.*"]),
    # the shipped configs travel with the package, so `s2moe train --config tiny` works after a plain
    # `pip install .` in any directory; the top-level configs/ and ds_configs/ are the user-facing copies
    # (tests/test_package_data.py keeps them identical)
    package_data={"s2moe_ds": ["configs/*.yaml", "ds_configs/*.json"]},
    python_requires=">=3.10",
    # versions are pinned in requirements.txt (what CI and the images install); ranges here
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.4",
        "tensorboard",
        "sentencepiece",
        "tokenizers",
        "numpy",
        "PyYAML",
        "tqdm",
        "safetensors",
    ],
    # megablocks: the backend calls grouped_gemm (MegaBlocks' grouped GEMM kernels, built against the
    # installed torch: `pip install --no-build-isolation -e .[megablocks]` on a CUDA machine). MegaBlocks
    # itself pins torch 2.7.0; requirements-megablocks.txt installs it with --no-deps instead.
    extras_require={
        "dev": ["pytest", "wandb", "transformers"],
        "megablocks": ["grouped_gemm>=0.3.0"],
        "wandb": ["wandb"],
        "hf": ["transformers>=5"],
    },
    entry_points={"console_scripts": ["s2moe=s2moe_ds.cli:main", "s2moe-train=s2moe_ds.cli.train:main"]},
)
