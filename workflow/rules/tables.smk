# The paper's tables and figures from the fine-tuning sweep (mutdet tables), the resolved config, and
# what `snakemake --report` bundles (every output wrapped in report() below, with its caption).


rule tables:
    input:
        metrics=all_finetune_metrics(),
        tiles=[t for d in finetuned_datasets() for t in finetune_tiles(d, finetune_run(d).test_split)],
    output:
        index=f"{RESULTS}/{TABLES_DIR}/index.md",
        **table_outputs(),
    params:
        mutdet=MUTDET,
        config=json.dumps(
            {
                "results": CONFIG.raw["results"],
                "datasets": CONFIG.raw["datasets"],
                "finetune": {"runs": CONFIG.raw["finetune"]["runs"]},
                "proposals": {"datasets": CONFIG.raw["proposals"]["datasets"]},
                "pretrain": {"variants": CONFIG.raw["pretrain"]["variants"], "loss_curves": CONFIG.raw["pretrain"]["loss_curves"]},
                "tables": CONFIG.raw["tables"],
            },
            sort_keys=True,
        ),
        out=lambda w, output: os.path.dirname(output.index),
    log:
        f"{LOGS}/tables.log",
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} tables --config {params.config:q} --metrics {input.metrics:q} --out {params.out:q} > {log:q} 2>&1"


rule resolved_config:
    output:
        report(f"{RESULTS}/config.resolved.yaml", caption="../report/config.rst", category="Configuration"),
    params:
        mutdet=MUTDET,
        config=json.dumps(dict(CONFIG.raw), sort_keys=True, default=str),
    log:
        f"{LOGS}/resolved_config.log",
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} config --config {params.config:q} --out {output:q} > {log:q} 2>&1"
