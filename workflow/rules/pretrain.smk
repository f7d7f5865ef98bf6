# Detection pre-training: one job per variant (mutdet, detreg, ablation variants) on the tiles of
# `proposals.datasets`, their proposals and cluster targets; then the loss-curve figure (Figure 4).
# Only the final checkpoint is a declared output: the resume state (checkpoints/last.pt, metrics.jsonl)
# survives a failed or killed job, and a rerun continues from it.


rule pretrain:
    input:
        tiles=pretrain_tiles(),
        proposals=pretrain_shard_files("proposals"),
        targets=pretrain_shard_files("targets"),
    output:
        checkpoint=f"{RESULTS}/pretrain/{{ptag}}/{{etag}}/{{variant}}/checkpoint.pt",
    params:
        mutdet=MUTDET,
        launch=LAUNCH,
        config=lambda w: pretrain_variant_json(w.variant),
        tiles=lambda w, input: [os.path.dirname(p) for p in input.tiles],
        out=lambda w, output: os.path.dirname(output.checkpoint),
    log:
        f"{LOGS}/pretrain/{{ptag}}/{{etag}}/{{variant}}.log",
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.launch} --gpus {resources.gpu} --torchrun --"
        " {params.mutdet} pretrain --config {params.config:q} --method {wildcards.variant} --tiles {params.tiles:q}"
        " --proposals {input.proposals:q} --targets {input.targets:q} --out {params.out:q} --threads {threads}"
        " > {log:q} 2>&1"


rule loss_curves:
    input:
        [pretrain_checkpoint(v) for v in CONFIG.pretrain.loss_curves.values() if v is not None],
    output:
        report(
            f"{RESULTS}/pretrain/{{ptag}}/{{etag}}/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="Pre-training",
        ),
    params:
        mutdet=MUTDET,
        runs=lambda w, input: " ".join(
            f"--run {shlex.quote(label)} {shlex.quote(os.path.join(os.path.dirname(p), 'metrics.jsonl'))}"
            for label, p in zip(
                [f"{v} ({k} enhancement)" for k, v in CONFIG.pretrain.loss_curves.items() if v is not None], input
            )
        ),
    log:
        f"{LOGS}/pretrain/{{ptag}}/{{etag}}/loss_curves.log",
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} loss-curves {params.runs} --out {output:q}"
        " --title 'Pre-training losses with and without the enhancement module' > {log:q} 2>&1"
