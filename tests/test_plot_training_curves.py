"""scripts/plot_training_curves.py reads every logged quantity (losses, metrics, probes) of a run's log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from repo_scripts import load_script
from PIL import Image


def _script():
    return load_script("scripts/plot_training_curves.py")


def _log(folder: Path, entries):
    folder.mkdir()
    (folder / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return folder


def test_curves_are_read_by_quantity_and_plotted(tmp_path):
    script = _script()
    a = _log(
        tmp_path / "a",
        [
            {
                "step": 1,
                "discriminator": 2.0,
                "generator": -1.0,
                "lr": {"x": 1e-3},
                "metrics": {"gradient_penalty": 0.5},
            },
            {
                "step": 2,
                "discriminator": 1.0,
                "generator": -2.0,
                "lr": {"x": 1e-3},
                "metrics": {"gradient_penalty": 0.25},
            },
            {"step": 2, "probe": {"alignment_2obj_4steps": 0.75}},
        ],
    )
    b = _log(tmp_path / "b", [{"step": 5, "discriminator": 3.0, "generator": 0.0, "lr": {"x": 1e-5}}])
    curves = script.read_curves(a / "log.jsonl")
    assert curves == {
        "discriminator": [(1, 2.0), (2, 1.0)],
        "generator": [(1, -1.0), (2, -2.0)],
        "metrics.gradient_penalty": [(1, 0.5), (2, 0.25)],
        "probe.alignment_2obj_4steps": [(2, 0.75)],
    }
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    names = script.plot({"a": a, "b": b / "log.jsonl"}, out)
    assert names == ["discriminator", "generator", "metrics.gradient_penalty", "probe.alignment_2obj_4steps"]
    assert Image.open(out).size[0] > 400
