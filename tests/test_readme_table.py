"""The README's demo table is generated (scripts/readme_table.py) and matches its source.

* the committed README block equals what the script makes of the committed snapshot
  ``docs/results/shift_demo.md`` (so a hand edit, or a snapshot refreshed without rerunning the
  script, fails here);
* from a demo output folder (a ``results.md`` + ``summary.json``), the script copies the table
  exactly into the snapshot and the README, and a second run changes nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("readme_table", os.path.join(ROOT, "scripts", "readme_table.py"))
rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rt)

RESULTS_MD = """## ShiftBench `deploy_shift` — DPO family — test set, 2 seed(s), mean ± s.e.

| method | deploy pref. acc. | KL to ref |
|---|---|---|
| reference (SFT) | — | 0.000 ± 0.000 |
| dpo | 0.700 ± 0.010 | 1.234 ± 0.100 |
| ipo | 0.737 ± 0.002 | 6.535 ± 2.386 |

trailing text that is not part of the table
"""


def test_readme_table_matches_the_committed_snapshot():
    with open(rt.SNAPSHOT, encoding="utf-8") as f:
        snap = f.read()
    with open(rt.README, encoding="utf-8") as f:
        readme = f.read()
    assert readme.count(rt.BEGIN) == 1 and readme.count(rt.END) == 1
    assert rt.replace_block(readme, rt.readme_block(snap)) == readme, \
        "README.md's demo table is stale: run `python scripts/readme_table.py` (after `make demo`: `make readme-table`)"
    assert rt.main(["--check"]) == 0
    # the README shows exactly the snapshot's table rows, one per method
    table = rt.table_of(snap)
    assert table in readme and "| ipo |" in table and "| reference (SFT) |" in table


def test_script_copies_a_demo_results_md_exactly(tmp_path):
    res = tmp_path / "shift_demo"
    res.mkdir()
    (res / "results.md").write_text(RESULTS_MD, encoding="utf-8")
    (res / "summary.json").write_text(json.dumps({"n_seeds": 2, "wall_time_s": 125.4}), encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{rt.BEGIN}\nstale\n{rt.END}\n\nafter\n", encoding="utf-8")
    snap = tmp_path / "shift_demo.md"
    args = ["--results", str(res), "--readme", str(readme), "--snapshot", str(snap)]
    assert rt.main(args) == 0
    text = readme.read_text(encoding="utf-8")
    want_table = "\n".join(line for line in RESULTS_MD.splitlines() if line.startswith("|"))
    assert f"{rt.BEGIN}\nMeasured by `make demo` on a {os.cpu_count()}-core CPU (2 min 5 s, 2 seeds):\n\n" \
           f"{want_table}\n{rt.END}" in text
    assert text.startswith("# x\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "stale" not in text
    assert rt.main(["--check", "--readme", str(readme), "--snapshot", str(snap)]) == 0
    assert rt.main(["--readme", str(readme), "--snapshot", str(snap)]) == 0 and readme.read_text(encoding="utf-8") == text
    readme.write_text(text.replace("0.737", "0.726"), encoding="utf-8")  # a hand edit is caught
    assert rt.main(["--check", "--readme", str(readme), "--snapshot", str(snap)]) == 1


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no markdown table"):
        rt.table_of("no table here\n")
    with pytest.raises(ValueError, match="has no"):
        rt.replace_block("a README without markers", "x")
