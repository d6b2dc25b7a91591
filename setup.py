from setuptools import find_packages, setup

setup(
    name="s2moe_ds",
    version="0.1.0",
    description="S2MoE and its sparse-MoE router family, trained under DeepSpeed",
    packages=find_packages(include=["s2moe_ds", "s2moe_ds.*"]),
    python_requires=">=3.10",
    # versions are pinned in requirements.txt (what CI and the images install); ranges here
    install_requires=["torch>=2.4", "deepspeed>=0.19.4", "tensorboard", "sentencepiece", "numpy", "PyYAML", "tqdm"],
    extras_require={"dev": ["pytest"]},
    entry_points={"console_scripts": ["s2moe=s2moe_ds.cli:main", "s2moe-train=s2moe_ds.train:main"]},
)
