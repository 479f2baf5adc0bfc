"""One report per sweep: SWEEP_DIR/report.md, the section chosen by the sweep's
experiment, then a table of all runs."""

from __future__ import annotations

from pathlib import Path

from loopedlm.experiments.report.reasoning import section_reasoning
from loopedlm.experiments.report.residual_scaling import section_residual_scaling
from loopedlm.experiments.report.runs import load_runs
from loopedlm.experiments.report.sections import (
    section_attention,
    section_loop_scaling,
    section_stability,
    section_test_time,
)
from loopedlm.experiments.report.tables import runs_table
from loopedlm.experiments.report.variable_loops import section_variable_loops

SECTIONS = {"loop_scaling": section_loop_scaling, "stability": section_stability,
            "attention": section_attention, "test_time": section_test_time,
            "residual_scaling": section_residual_scaling,
            "variable_loops": section_variable_loops, "reasoning": section_reasoning}
EXPERIMENTS = (*SECTIONS, "custom")  # a custom sweep's report has no section: its runs only


def write_report(sweep_dir: str | Path) -> Path:
    """Write SWEEP_DIR/report.md and its figures; returns the report's path."""
    sweep_dir = Path(sweep_dir)
    manifest, runs = load_runs(sweep_dir)
    experiment = manifest.get("experiment", "custom")
    cmd = (f"Made by `{manifest.get('command', 'loopedlm sweep')}` then "
           f"`loopedlm report {sweep_dir}`.")
    parts = [f"# Sweep report: {sweep_dir.name} ({experiment})\n"]
    if manifest.get("description"):
        parts.append(manifest["description"].strip() + "\n")
    done = [r for r in runs if r["summary"]]
    parts.append(f"{len(done)} of {len(runs)} runs have a summary. {cmd}\n")
    if experiment in SECTIONS and done:
        parts += SECTIONS[experiment](done, sweep_dir, cmd)
    parts.append("## All runs\n\n" + runs_table(runs))
    report = sweep_dir / "report.md"
    report.write_text("\n".join(parts))
    return report
