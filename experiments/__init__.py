"""Scientific validation of lightning-comhe: scripts that regenerate every table and figure of ``docs/results.md``.

One command each (run from the repository root)::

    python -m experiments.accuracy              # accuracy table (digits; CIFAR with --cifar-root)
    python -m experiments.energy_figure         # full-space hyperspherical energy over training
    python -m experiments.ablation              # projection dimension k and number of projections C
    python -m experiments.projection_guarantee  # the random-projection angle bound
    python -m experiments.run_all [--quick]     # everything

Results (JSON, Markdown, PNG) go to ``experiments/results/`` (``--out``); full runs also refresh the generated blocks
of ``docs/results.md``.
"""
