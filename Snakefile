# mutdet: from raw aerial images to the paper's tables. Includes and targets only; see workflow/rules/.
from snakemake.utils import min_version

min_version("9.0")

# `--configfile X` replaces the default config instead of being merged into it. The default is read
# by mutdet first: a YAML syntax error is then reported with its line and column (for a file given with
# --configfile, Snakemake reports it without them; `mutdet config --config FILE` shows where).
if not workflow.overwrite_configfiles:
    from mutdet.config import read_yaml

    read_yaml("config.yaml")

    configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/pretrain_data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/tables.smk"


rule all:
    default_target: True
    input:
        all_tiles(),
        all_fractions(),
        pretrain_files("targets") if CONFIG.pretraining_needed() else [],
        [p(LAYOUT.pretrain_checkpoint(v)) for v in all_pretrain_variants()],
        loss_curves_figure(),
        all_finetune_metrics(),
        [p(LAYOUT.tables_dir() / "index.md")] if CONFIG.finetune.runs else [],
        p(LAYOUT.resolved_config()),
