"""Studies: a grid of compression cells (method x sparsity/bits x calibration), each compressed and evaluated
against the base model, recorded one JSON line per cell in DIR/results.jsonl, and rendered as a report."""
from lmsqueeze.study.grid import Cell, StudySpec, expand_grid, load_study_file
from lmsqueeze.study.report import render_report, write_report
from lmsqueeze.study.runner import read_results, run_study

__all__ = ["Cell", "StudySpec", "expand_grid", "load_study_file", "read_results", "render_report", "run_study",
           "write_report"]
