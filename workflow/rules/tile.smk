# DOTA-style tiling, one job per dataset x split x shard.


rule tile:
    input:
        lambda w: dataset_inputs(w.dataset, w.split),
        raw=lambda w: raw_files(w.dataset, w.split, w.shard),
    output:
        tiles=p(LAYOUT.tiles_dir("{dataset}", "{split}", "{shard}") / "tiles.parquet"),
        objects=p(LAYOUT.tiles_dir("{dataset}", "{split}", "{shard}") / "objects.parquet"),
        summary=p(LAYOUT.tiles_dir("{dataset}", "{split}", "{shard}") / "summary.json"),
    params:
        mutdet=MUTDET,
        config=CONFIG_FILE,
        sections=sections("tile", dataset="dataset"),
        out=lambda w, output: os.path.dirname(output.tiles),
    log:
        f"{LOGS}/tile/{{dataset}}/{{split}}/shard-{{shard}}.log",
    threads: 2
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} tile --config {params.config:q} --dataset {wildcards.dataset} --split {wildcards.split}"
        " --shard {wildcards.shard} --out {params.out:q} --threads {threads} > {log:q} 2>&1"
