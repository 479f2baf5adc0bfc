"""`loopedlm report SWEEP_DIR`: the paper's tables and figures from a finished sweep.

Reads SWEEP_DIR/sweep.json (written by `loopedlm sweep`), each run's summary.json and
log.jsonl, and each run's eval/results.json when present, and writes
SWEEP_DIR/report.md with PNG figures beside it. Every figure is titled with what it
shows and captioned with the exact commands that made it. Seeds are aggregated as
mean +- standard deviation (and min..max bands in figures).

- `runs`: reading a sweep and the settings and results of its runs
- `tables`, `figures`: the Markdown tables and PNG figures every section draws with
- `sections`: one section per experiment of the FLT paper (loop scaling, stability,
  attention variants, test-time loops)
- `lr_curves`, `claims`, `residual_scaling`: the residual-scaling paper's learning-rate
  curves, its claims decided from them, and its section
- `variable_loops`: variable-N against fixed-N training (issue 14)
- `reasoning`: the synthetic reasoning tasks, accuracy by hops and loops (issue 28)
- `write`: one report per sweep, the section chosen by the sweep's experiment
"""
