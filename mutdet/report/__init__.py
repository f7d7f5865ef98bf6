"""Reports of the fine-tuning sweep: the paper's tables and figures, from plain arguments.

* :mod:`mutdet.report.tables`: reading ``metrics.json``, the main / low-data / ablation tables and
  their Markdown, CSV and LaTeX rendering;
* :mod:`mutdet.report.figures`: the AP50-vs-fraction plot and the detection grid;
* :mod:`mutdet.report.draw`: oriented (le90) boxes drawn on an image, shared with ``mutdet detect``.

Nothing here reads a config or knows where the pipeline puts its files: :mod:`mutdet.stages.tables`
turns the config and the stage's inputs into these functions' arguments.
"""
