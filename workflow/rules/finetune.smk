# Fine-tuning per dataset x initialisation x data fraction x schedule, then detection on the test split.
# The evaluate rule (evaluate.smk) scores `detections.parquet` into `metrics.json` beside it.
# Only the final checkpoint and detections are declared outputs: the resume state (checkpoints/last.pt,
# metrics.jsonl) must survive a failed or killed job.


rule finetune:
    input:
        train=lambda w: finetune_tiles(w.dataset, finetune_run(w.dataset).train_split),
        test=lambda w: finetune_tiles(w.dataset, w.split),
        subset=lambda w: f"{RESULTS}/{w.dataset}/fractions/{finetune_run(w.dataset).train_split}/frac~{w.fraction}.txt",
        init=lambda w: finetune_init_inputs(w.init),
    output:
        checkpoint=f"{RESULTS}/{FINETUNE_DIR}/checkpoint.pt",
        detections=f"{RESULTS}/{FINETUNE_DIR}/detections.parquet",
    params:
        mutdet=MUTDET,
        launch=LAUNCH,
        config=lambda w: finetune_config_json(w.dataset),
        tiles=lambda w, input: [os.path.dirname(p) for p in input.train],
        test_tiles=lambda w, input: [os.path.dirname(p) for p in input.test],
        out=lambda w, output: os.path.dirname(output.checkpoint),
        init=lambda w, input: input.init[0] if input.init else "none",
    log:
        f"{LOGS}/{FINETUNE_DIR}.log",
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.launch} --gpus {resources.gpu} --torchrun --"
        " {params.mutdet} finetune --config {params.config:q} --dataset {wildcards.dataset} --tiles {params.tiles:q}"
        " --test-tiles {params.test_tiles:q} --image-ids {input.subset:q} --init {params.init:q}"
        " --epochs {wildcards.epochs} --out {params.out:q} --threads {threads} > {log:q} 2>&1"
