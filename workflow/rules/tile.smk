# DOTA-style tiling, one job per dataset x split x shard.


rule tile:
    input:
        lambda w: dataset_inputs(w.dataset, w.split),
        raw=lambda w: raw_files(w.dataset, w.split, w.shard),
    output:
        tiles=f"{RESULTS}/{TILES_DIR}/tiles.parquet",
        objects=f"{RESULTS}/{TILES_DIR}/objects.parquet",
        summary=f"{RESULTS}/{TILES_DIR}/summary.json",
    params:
        mutdet=MUTDET,
        config=lambda w: dataset_config_json(w.dataset),
        out=lambda w, output: os.path.dirname(output.tiles),
    log:
        f"{LOGS}/tile/{{dataset}}/{{split}}/shard-{{shard}}.log",
    threads: 2
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} tile --config {params.config:q} --dataset {wildcards.dataset} --split {wildcards.split}"
        " --shard {wildcards.shard} --out {params.out:q} --threads {threads} > {log:q} 2>&1"
