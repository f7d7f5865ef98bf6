# Pre-training data: proposals -> embeddings per shard, then one clustering over all shards.
# Output folders carry a tag of the parameters that determine them (e.g. `graph-1a2b3c4d`), so
# changing a proposal or embedding parameter makes new outputs instead of mixing old and new.


rule propose:
    input:
        tiles=tiles_path("{dataset}", "{split}", "{shard}", "tiles.parquet"),
    output:
        proposals=f"{RESULTS}/{{dataset}}/proposals/{{ptag}}/{{split}}/shard-{{shard}}/proposals.parquet",
        manifest=f"{RESULTS}/{{dataset}}/proposals/{{ptag}}/{{split}}/shard-{{shard}}/manifest.json",
    params:
        mutdet=MUTDET,
        launch=LAUNCH,
        config=lambda w: pretrain_config_json(w.dataset),
        tiles=lambda w, input: os.path.dirname(input.tiles),
        out=lambda w, output: os.path.dirname(output.proposals),
    log:
        f"{LOGS}/propose/{{dataset}}/{{ptag}}/{{split}}/shard-{{shard}}.log",
    threads: 2
    resources:
        gpu=1 if CONFIG.proposals.method == "sam" else 0,
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.launch} --gpus {resources.gpu} --"
        " {params.mutdet} propose --config {params.config:q} --dataset {wildcards.dataset} --split {wildcards.split}"
        " --shard {wildcards.shard} --tiles {params.tiles:q} --out {params.out:q} --threads {threads} > {log:q} 2>&1"


rule embed:
    input:
        tiles=tiles_path("{dataset}", "{split}", "{shard}", "tiles.parquet"),
        proposals=f"{RESULTS}/{{dataset}}/proposals/{{ptag}}/{{split}}/shard-{{shard}}/proposals.parquet",
    output:
        embeddings=f"{RESULTS}/{{dataset}}/embeddings/{{ptag}}/{{etag}}/{{split}}/shard-{{shard}}/embeddings.parquet",
    params:
        mutdet=MUTDET,
        launch=LAUNCH,
        config=lambda w: pretrain_config_json(w.dataset),
        tiles=lambda w, input: os.path.dirname(input.tiles),
        proposals=lambda w, input: os.path.dirname(input.proposals),
        out=lambda w, output: os.path.dirname(output.embeddings),
    log:
        f"{LOGS}/embed/{{dataset}}/{{ptag}}/{{etag}}/{{split}}/shard-{{shard}}.log",
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.launch} --gpus {resources.gpu} --"
        " {params.mutdet} embed --config {params.config:q} --tiles {params.tiles:q} --proposals {params.proposals:q}"
        " --out {params.out:q} --threads {threads} > {log:q} 2>&1"


rule cluster:
    input:
        embeddings=pretrain_shard_files("embeddings"),
    output:
        model=f"{RESULTS}/targets/{PROPOSALS_TAG}/{EMBED_TAG}/pca_kmeans.npz",
        manifest=f"{RESULTS}/targets/{PROPOSALS_TAG}/{EMBED_TAG}/manifest.json",
        targets=pretrain_shard_files("targets"),
    params:
        mutdet=MUTDET,
        config=json.dumps({"seed": CONFIG.seed, "cluster": CONFIG.raw["cluster"]}, sort_keys=True),
        out=lambda w, output: os.path.dirname(output.model),
    log:
        f"{LOGS}/cluster/{PROPOSALS_TAG}/{EMBED_TAG}.log",
    threads: 2
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} cluster --config {params.config:q} --embeddings {input.embeddings:q}"
        " --targets {output.targets:q} --out {params.out:q} --threads {threads} > {log:q} 2>&1"
