# The paper's tables and figures from the fine-tuning sweep (mutdet tables), the resolved config, and
# what `snakemake --report` bundles (every output wrapped in report() below, with its caption).


rule tables:
    input:
        metrics=[r["metrics"] for r in tables_inputs()["runs"]],
        detections=[r["detections"] for r in tables_inputs()["runs"]],
        tiles=[p(Path(d) / "tiles.parquet") for dirs in tables_inputs()["test_tiles"].values() for d in dirs],
    output:
        index=p(LAYOUT.tables_dir() / "index.md"),
        **table_outputs(),
    params:
        mutdet=MUTDET,
        config=CONFIG_FILE,
        sections=CONFIG.sections_digest("tables"),
        inputs=json.dumps(tables_inputs(), sort_keys=True),
        out=lambda w, output: os.path.dirname(output.index),
    log:
        f"{LOGS}/tables.log",
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} tables --config {params.config:q} --inputs {params.inputs:q} --out {params.out:q}"
        " > {log:q} 2>&1"


rule resolved_config:
    output:
        report(p(LAYOUT.resolved_config()), caption="../report/config.rst", category="Configuration"),
    params:
        mutdet=MUTDET,
        config=CONFIG_FILE,
        sections=CONFIG.sections_digest("config"),
    log:
        f"{LOGS}/resolved_config.log",
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} config --config {params.config:q} --out {output:q} > {log:q} 2>&1"
