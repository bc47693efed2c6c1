"""The mutation audit's list stays current: every planted bug's snippet still occurs exactly once in the source
(running the mutants themselves takes minutes and is a developer tool: scripts/mutants.py)."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutants.py"


def test_every_mutant_snippet_occurs_once():
    spec = importlib.util.spec_from_file_location("mutants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = module
    spec.loader.exec_module(module)
    assert len(module.MUTANTS) >= 19
    assert module.check_snippets(module.MUTANTS, module.ROOT) == []
