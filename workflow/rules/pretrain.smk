# Detection pre-training: one job per variant (mutdet, detreg, ablation variants) on the tiles of
# `proposals.datasets`, their proposals and cluster targets; then the loss-curve figure (Figure 4).
# Only the final checkpoint is a declared output: the resume state (checkpoints/last.pt, metrics.jsonl)
# survives a failed or killed job, and a rerun continues from it.


rule pretrain:
    input:
        tiles=pretrain_files("tiles"),
        proposals=pretrain_files("proposals"),
        targets=pretrain_files("targets"),
    output:
        checkpoint=p(LAYOUT.pretrain_checkpoint("{variant}")),
    params:
        mutdet=MUTDET,
        launch=LAUNCH,
        config=CONFIG_FILE,
        sections=sections("pretrain", variant="variant"),
        tiles=lambda w, input: [os.path.dirname(f) for f in input.tiles],
        out=lambda w, output: os.path.dirname(output.checkpoint),
    log:
        f"{LOGS}/pretrain/{LAYOUT.proposals_tag}/{LAYOUT.embedding_tag}/{{variant}}.log",
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.launch} --gpus {resources.gpu} --torchrun --"
        " {params.mutdet} pretrain --config {params.config:q} --variant {wildcards.variant} --tiles {params.tiles:q}"
        " --proposals {input.proposals:q} --targets {input.targets:q} --out {params.out:q} --threads {threads}"
        " > {log:q} 2>&1"


rule loss_curves:
    input:
        [p(LAYOUT.pretrain_checkpoint(v)) for _, v in loss_curve_variants()],
    output:
        report(p(LAYOUT.loss_curves_figure()), caption="../report/loss_curves.rst", category="Pre-training"),
    params:
        mutdet=MUTDET,
        sections=CONFIG.sections_digest("loss_curves"),
        runs=" ".join(
            f"--run {shlex.quote(label)} {shlex.quote(p(LAYOUT.pretrain_dir(v) / 'metrics.jsonl'))}"
            for label, v in loss_curve_variants()
        ),
    log:
        f"{LOGS}/pretrain/{LAYOUT.proposals_tag}/{LAYOUT.embedding_tag}/loss_curves.log",
    conda:
        "../../envs/mutdet.yaml"
    shell:
        "{params.mutdet} loss-curves {params.runs} --out {output:q}"
        " --title 'Pre-training losses with and without the enhancement module' > {log:q} 2>&1"
