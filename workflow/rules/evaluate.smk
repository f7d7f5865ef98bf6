# Data-fraction subsets, and evaluation of full-image detections.


rule subset:
    input:
        lambda w: dataset_inputs(w.dataset, w.split),
    output:
        p(LAYOUT.fractions_file("{dataset}", "{split}", "{fraction}")),
    params:
        mutdet=MUTDET,
        config=CONFIG_FILE,
        sections=sections("subset", dataset="dataset"),
    log:
        f"{LOGS}/subset/{{dataset}}/{{split}}/frac~{{fraction}}.log",
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} subset --config {params.config:q} --dataset {wildcards.dataset} --split {wildcards.split}"
        " --fraction {wildcards.fraction} --out {output:q} > {log:q} 2>&1"


# Any `<run>/<dataset>/<split>/detections.parquet` (full-image frame) -> metrics beside it.
rule evaluate:
    input:
        lambda w: dataset_inputs(w.dataset, w.split),
        raw=lambda w: raw_files(w.dataset, w.split),
        detections=f"{RESULTS}/{{run}}/{{dataset}}/{{split}}/detections.parquet",
    output:
        metrics=f"{RESULTS}/{{run}}/{{dataset}}/{{split}}/metrics.json",
        pr_curve=f"{RESULTS}/{{run}}/{{dataset}}/{{split}}/pr_curve.png",
    params:
        mutdet=MUTDET,
        config=CONFIG_FILE,
        sections=sections("evaluate", dataset="dataset"),
        out=lambda w, output: os.path.dirname(output.metrics),
    log:
        f"{LOGS}/evaluate/{{run}}/{{dataset}}/{{split}}.log",
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} evaluate --config {params.config:q} --dataset {wildcards.dataset} --split {wildcards.split}"
        " --detections {input.detections:q} --out {params.out:q} > {log:q} 2>&1"
