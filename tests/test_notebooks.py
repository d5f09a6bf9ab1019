"""The notebooks execute (nbclient) against a small real results fixture and are committed
without outputs. They read only summary.json / metrics.jsonl, so nothing is trained here."""

import asyncio
import glob
import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "results")
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, "*.ipynb")))


def test_notebooks_present_and_stripped():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"00_overview.ipynb", "01_iw_dpo_deploy_shift.ipynb", "02_robust_dpo_preference_shift.ipynb",
            "03_dora_synthetic_shift.ipynb", "04_flr_followup.ipynb"} <= names
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, f"{p}: commit notebooks without outputs"
            # they read results files only: never import the training code
            assert "alignshift.train" not in c.source and "run_experiment" not in c.source


def test_fixture_is_real_results():
    for run in ("shift_demo", "iw_dpo", "robust_dpo"):
        with open(os.path.join(FIXTURE, run, "summary.json")) as f:
            s = json.load(f)
        assert {"scenario", "seed", "methods", "config"} <= set(s)
        assert os.path.getsize(os.path.join(FIXTURE, run, "metrics.jsonl")) > 0


async def _execute(path, env_results):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": NB_DIR}})
    await client.async_execute()
    return nb


def test_notebooks_execute(monkeypatch):
    """All notebooks at once (kernels start concurrently), against the committed fixture."""
    monkeypatch.setenv("ALIGNSHIFT_RESULTS", FIXTURE)
    monkeypatch.setenv("MPLBACKEND", "Agg")

    async def run_all():
        return await asyncio.gather(*[_execute(p, FIXTURE) for p in NOTEBOOKS])

    done = asyncio.run(run_all())
    outputs = {}
    for p, nb in zip(NOTEBOOKS, done):
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{p}: {errors[0]['ename']}: {errors[0]['evalue']}"
        outputs[os.path.basename(p)] = nb
    # they rendered real content: tables (HTML) and figures (PNG) from the fixture
    def kinds(nb):
        return {k for c in nb.cells if c.cell_type == "code" for o in c.outputs for k in o.get("data", {})}

    for name in ("00_overview.ipynb", "01_iw_dpo_deploy_shift.ipynb", "02_robust_dpo_preference_shift.ipynb"):
        assert {"text/html", "image/png"} <= kinds(outputs[name]), name
    text = json.dumps(outputs["01_iw_dpo_deploy_shift.ipynb"].cells[2].outputs)
    assert "iw_dpo_l" in text and "deploy_pref_acc" in text
