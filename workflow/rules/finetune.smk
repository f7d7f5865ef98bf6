# Fine-tuning per dataset x initialisation x data fraction x schedule x seed, then detection on the test
# tiles (every seed of a cell trains on the same fraction list file, drawn with the top-level seed);
# the merge rule (a CPU job) maps the tile detections to full images, and the evaluate rule
# (evaluate.smk) scores `detections.parquet` into `metrics.json` beside it. Only the final checkpoint and
# tile detections are declared outputs of fine-tuning: the resume state (checkpoints/last.pt,
# metrics.jsonl) must survive a failed or killed job.
FINETUNE_DIR = LAYOUT.finetune_dir("{init}", "{fraction}", "{epochs}", "{seed}", "{dataset}", "{split}")


rule finetune:
    input:
        train=lambda w: split_tiles(w.dataset, finetune_run(w.dataset).train_split),
        test=lambda w: split_tiles(w.dataset, w.split),
        subset=lambda w: p(LAYOUT.fractions_file(w.dataset, finetune_run(w.dataset).train_split, w.fraction)),
        init=lambda w: [] if w.init == "none" else [p(LAYOUT.pretrain_checkpoint(w.init))],
    output:
        checkpoint=p(FINETUNE_DIR / "checkpoint.pt"),
        tile_detections=p(FINETUNE_DIR / "detections_tiles.parquet"),
    params:
        mutdet=MUTDET,
        launch=LAUNCH,
        config=CONFIG_FILE,
        sections=sections("finetune", dataset="dataset"),
        tiles=lambda w, input: [os.path.dirname(f) for f in input.train],
        test_tiles=lambda w, input: [os.path.dirname(f) for f in input.test],
        out=lambda w, output: os.path.dirname(output.checkpoint),
        init=lambda w, input: input.init[0] if input.init else "none",
    log:
        p(LAYOUT.logs_dir() / f"{FINETUNE_DIR.relative_to(RESULTS)}.log"),
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.launch} --gpus {resources.gpu} --torchrun --"
        " {params.mutdet} finetune --config {params.config:q} --dataset {wildcards.dataset} --tiles {params.tiles:q}"
        " --test-tiles {params.test_tiles:q} --image-ids {input.subset:q} --init {params.init:q}"
        " --epochs {wildcards.epochs} --seed {wildcards.seed} --out {params.out:q} --threads {threads} > {log:q} 2>&1"


rule merge:
    input:
        detections=p(FINETUNE_DIR / "detections_tiles.parquet"),
        tiles=lambda w: split_tiles(w.dataset, w.split),
    output:
        detections=p(FINETUNE_DIR / "detections.parquet"),
    params:
        mutdet=MUTDET,
        config=CONFIG_FILE,
        sections=sections("merge", dataset="dataset"),
        tiles=lambda w, input: [os.path.dirname(f) for f in input.tiles],
    log:
        p(LAYOUT.logs_dir() / "merge" / f"{FINETUNE_DIR.relative_to(RESULTS)}.log"),
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} merge --config {params.config:q} --dataset {wildcards.dataset}"
        " --detections {input.detections:q} --tiles {params.tiles:q} --out {output.detections:q} > {log:q} 2>&1"
