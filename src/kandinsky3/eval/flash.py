"""What Flash distillation buys (issue #16): text alignment of a 4-step Flash student beside its teacher.

Rows, on the same captions and seeds: the teacher at its defaults (50 steps with guidance), the student with the
Flash sampler and no guidance, and the two baselines the recipe must beat — the teacher itself sampled with the
Flash sampler at 4 steps, and with 4-step DDIM.
"""

from __future__ import annotations

from .alignment import AlignmentReport, evaluate_alignment

GROUPS = ("1 object", "2 objects")


def flash_rows(student, teacher, num: int = 500, steps: int = 4, progress: bool = True) -> dict[str, AlignmentReport]:
    runs = {
        "teacher (its defaults)": (teacher, None, None, None),
        f"student, flash, {steps} steps": (student, "flash", steps, 0.0),
        f"teacher, flash sampler, {steps} steps": (teacher, "flash", steps, 0.0),
        f"teacher, ddim, {steps} steps": (teacher, "ddim", steps, None),
    }
    return {
        name: evaluate_alignment(pipe, num, guidance, n, held_out=0, progress=progress, sampler=sampler)
        for name, (pipe, sampler, n, guidance) in runs.items()
    }


def flash_table(rows: dict[str, AlignmentReport]) -> str:
    lines = [f"{'':<34}" + "".join(f"{g:>12}" for g in GROUPS) + "   sampler, guidance, steps"]
    for name, report in rows.items():
        rates = "".join(f"{report.rate(g):>12.1%}" for g in GROUPS)
        lines.append(f"{name:<34}{rates}   {report.sampler}, {report.guidance}, {report.steps}")
    return "\n".join(lines)
