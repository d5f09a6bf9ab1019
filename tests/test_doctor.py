"""``python -m alignshift.doctor`` runs on the CPU: versions, backend, devices, memory, exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                     "JAX_PROCESS_ID", "SLURM_", "OMPI_"))}
    e.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-m", "alignshift.doctor", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=120)


def test_doctor_on_cpu(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    p = _run("--json", str(out))
    assert p.returncode == 0, p.stderr
    text = p.stdout
    import jax

    assert f"jax {jax.__version__}" in text and "backend: cpu" in text
    assert "devices: 2 (2 local)" in text and "process 0 of 1" in text
    assert text.count("device ") >= 2 and "host RAM" in text  # CPU: no per-device memory stats
    assert "cuDNN attention: n/a" in text and "needs a GPU" in text  # checked on a GPU only
    rep = json.loads(out.read_text())
    assert rep["backend"] == "cpu" and rep["device_count"] == 2 and len(rep["devices"]) == 2
    assert rep["packages"]["jax"] == jax.__version__ and rep["cudnn_attention"]["available"] is None
    assert rep["launcher"] is None and rep["distributed_initialised"] is False
    assert rep["host_memory_gib"] > 0
    # --require: a missing accelerator is a non-zero exit with one error line (in-process: same code)
    from alignshift.doctor import main

    assert main(["--require", "cpu"]) == 0 and main(["--require", "gpu"]) == 1
    assert capsys.readouterr().err.strip() == "error: backend is cpu, not gpu"
