"""The mutation audit's list stays current: every planted bug's snippet still occurs exactly once in the source
(running the mutants themselves takes minutes and is a developer tool: scripts/mutants.py)."""

from repo_scripts import load_script


def test_every_mutant_snippet_occurs_once():
    module = load_script("scripts/mutants.py")
    assert len(module.MUTANTS) >= 19
    assert module.check_snippets(module.MUTANTS, module.ROOT) == []
