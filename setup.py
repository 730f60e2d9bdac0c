from setuptools import find_packages, setup

setup(
    name="g2e_jax",
    version="0.1.0",
    description="From Generator to Embedder in JAX/Flax: a multimodal LLM as a universal multimodal embedding model",
    long_description=open("README.md", encoding="utf-8").read()
    if __import__("os").path.exists("README.md")
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["g2e_jax", "g2e_jax.*"]),
    package_data={"g2e_jax": ["assets/*.json"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "transformers>=5.0",
        "datasets",
        "tensorflow-datasets",
        "pillow",
        "ml-collections",
        "safetensors",
        "tokenizers",
        "tqdm",
        "matplotlib",
        "ml_dtypes",
        "numpy",
    ],
    extras_require={
        # torch: install the CPU build first (`pip install torch==2.13.0`), see README.
        "test": ["pytest", "pytest-xdist", "torch", "peft"],
        # `g2e-jax compare` live mode (the PyTorch reference; peft for adapters).
        "torch": ["torch", "peft"],
        # MTEB / MIEB evaluation (g2e_jax.integrations.mteb); pulls sentence-transformers and torch.
        "mteb": ["mteb>=2.0,<3"],
    },
    entry_points={"console_scripts": ["g2e-jax=g2e_jax.cli:main"]},
)
