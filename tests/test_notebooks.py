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


def _summary(run, *sub):
    with open(os.path.join(FIXTURE, run, *sub, "summary.json")) as f:
        return json.load(f)


def test_fixture_is_real_results():
    """Every run a notebook reads by default is in the fixture (make_results_fixture.py), in the
    schema its experiment script writes, so CI executes the results paths, not 'no results'."""
    for run in ("shift_demo", "iw_dpo", "iw_ceiling", "robust_dpo", "dora", "flr"):
        s = _summary(run)
        assert {"scenario", "seed", "methods", "config"} <= set(s)
        assert os.path.getsize(os.path.join(FIXTURE, run, "metrics.jsonl")) > 0
        assert os.path.getsize(os.path.join(FIXTURE, run, "metrics.jsonl")) < 200_000
    assert {"dpo_train", "iw_dpo_r_med", "iw_true_ratio"} <= set(_summary("iw_ceiling")["methods"])
    dora = _summary("dora")
    assert dora["scenario"] == "synthetic_shift" and {"dpo_dora", "pl_dora"} <= set(dora["methods"])
    assert {"classifier", "mean_h_by_source", "H_ess"} <= set(dora["diagnostics"]) and dora["paired"]
    assert all(r["bins"] for r in _summary("dora", "seed_0")["diagnostics"]["classifier"]["reports"].values())
    flr = _summary("flr")
    assert flr["scenario"] == "followup" and {"FLR", "FLR repo difference", "Direct"} <= set(flr["reward_models"])
    assert {"pair_acc", "pearson", "spearman"} <= set(flr["reward_models"]["Direct"])
    assert "dpo (FLR-mined)" in flr["methods"]


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

    def text(nb):
        return json.dumps([c.outputs for c in nb.cells if c.cell_type == "code"], ensure_ascii=False)

    for name, nbk in outputs.items():
        assert {"text/html", "image/png"} <= kinds(nbk), name
        assert "no results at" not in text(nbk), name  # each read its run from the fixture
    t = json.dumps(outputs["01_iw_dpo_deploy_shift.ipynb"].cells[2].outputs)
    assert "iw_dpo_l" in t and "deploy_pref_acc" in t
    assert "iw_true_ratio" in text(outputs["01_iw_dpo_deploy_shift.ipynb"])  # the iw_ceiling table
    # 03: the DoRA table, paired comparisons and the classifier's calibration diagnostics
    t = text(outputs["03_dora_synthetic_shift.ipynb"])
    for s in ("pl_dora", "target_pref_acc_flat", "dpo_dora - dpo_reweight", "oracle-feature auc", "ece",
              "mean h̃ (response)", "share_of_H_on_target"):
        assert s in t, s
    # 04: the FLR vs Direct reward-model table (summary["reward_models"]) and the policies
    t = text(outputs["04_flr_followup.ipynb"])
    for s in ("FLR repo difference", "FLR likelihood negative", "Direct", "length (baseline)", "spearman",
              "(no aggregation)", "dpo (GT-mined)", "pair_label_acc"):
        assert s in t, s
