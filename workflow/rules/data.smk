# The embedded demo datasets (generated or copied), one rule per dataset whose source is not `files`.
for _name, _ds in CONFIG.datasets.items():
    if _ds.source == "files":
        continue

    rule:
        name:
            f"demo_data_{_name}"
        output:
            manifest=str(_ds.root / "MANIFEST.json"),
        params:
            mutdet=MUTDET,
            config=CONFIG_FILE,
            sections=CONFIG.sections_digest("demo_data", dataset=_name),
            dataset=_name,
        log:
            f"{LOGS}/demo_data/{_name}.log",
        conda:
            "../../envs/mutdet.yaml"
        shell:
            "{params.mutdet} demo-data --config {params.config:q} --dataset {params.dataset} > {log:q} 2>&1"
