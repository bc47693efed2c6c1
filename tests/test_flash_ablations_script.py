"""scripts/flash_ablations.py (the ablation table of docs/flash.md): every row on the same captions and seeds, the
rates it prints are the alignment eval's at the Flash sampler with no guidance."""

from __future__ import annotations

import json

import pytest
from repo_scripts import load_script


def _script():
    return load_script("scripts/flash_ablations.py")


def test_rows_are_the_alignment_eval_at_flash_steps(tmp_path, capsys):
    from kandinsky3 import Kandinsky3
    from kandinsky3.eval.alignment import evaluate_alignment

    out = tmp_path / "table.json"
    results = _script().main(["a=tiny", "b=tiny", "--num", "5", "--steps", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    assert results["a"] == results["b"] and set(results["a"]) == {"model", "2 steps"}
    report = evaluate_alignment(Kandinsky3.from_pretrained("tiny"), 5, 0.0, 2, held_out=0, progress=False,
                                sampler="flash")  # fmt: skip
    assert results["a"]["2 steps"] == {g: round(report.rate(g), 4) for g in ("1 object", "2 objects")}
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("| a | ")


def test_a_row_without_a_model_is_refused():
    with pytest.raises(SystemExit):
        _script().main(["just-a-label"])
