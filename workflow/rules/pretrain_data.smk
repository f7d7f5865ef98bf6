# Pre-training data: proposals -> embeddings per shard, then one clustering over all shards.
# Output folders carry a tag of the parameters that determine them (e.g. `graph-1a2b3c4d`; see
# mutdet.layout), so changing a proposal or embedding parameter makes new outputs instead of mixing
# old and new.
SHARD = ("{dataset}", "{split}", "{shard}")


rule propose:
    input:
        tiles=p(LAYOUT.tiles_table(*SHARD)),
    output:
        proposals=p(LAYOUT.proposals_dir(*SHARD) / "proposals.parquet"),
        manifest=p(LAYOUT.proposals_dir(*SHARD) / "manifest.json"),
    params:
        mutdet=MUTDET,
        launch=LAUNCH,
        config=CONFIG_FILE,
        sections=sections("propose"),
        tiles=lambda w, input: os.path.dirname(input.tiles),
        out=lambda w, output: os.path.dirname(output.proposals),
    log:
        f"{LOGS}/propose/{{dataset}}/{LAYOUT.proposals_tag}/{{split}}/shard-{{shard}}.log",
    # SAM runs torch on its threads; graph segmentation and selective search are single-threaded OpenCV
    # (a second reserved core would sit idle while another job waits for it)
    threads: 2 if CONFIG.proposals.method == "sam" else 1
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
        tiles=p(LAYOUT.tiles_table(*SHARD)),
        proposals=p(LAYOUT.proposals_dir(*SHARD) / "proposals.parquet"),
    output:
        embeddings=p(LAYOUT.embeddings_dir(*SHARD) / "embeddings.parquet"),
    params:
        mutdet=MUTDET,
        launch=LAUNCH,
        config=CONFIG_FILE,
        sections=sections("embed"),
        tiles=lambda w, input: os.path.dirname(input.tiles),
        proposals=lambda w, input: os.path.dirname(input.proposals),
        out=lambda w, output: os.path.dirname(output.embeddings),
    log:
        f"{LOGS}/embed/{{dataset}}/{LAYOUT.proposals_tag}/{LAYOUT.embedding_tag}/{{split}}/shard-{{shard}}.log",
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
        embeddings=pretrain_files("embeddings"),
    output:
        model=p(LAYOUT.cluster_dir() / "pca_kmeans.npz"),
        manifest=p(LAYOUT.cluster_dir() / "manifest.json"),
        targets=pretrain_files("targets"),
    params:
        mutdet=MUTDET,
        config=CONFIG_FILE,
        sections=CONFIG.sections_digest("cluster"),
        out=lambda w, output: os.path.dirname(output.model),
    log:
        f"{LOGS}/cluster/{LAYOUT.proposals_tag}/{LAYOUT.embedding_tag}.log",
    threads: 2
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} cluster --config {params.config:q} --embeddings {input.embeddings:q}"
        " --targets {output.targets:q} --out {params.out:q} --threads {threads} > {log:q} 2>&1"
