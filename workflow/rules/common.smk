# Shared set-up: the validated config, the file every job reads it from, the mutdet command, targets.
#
# How configuration reaches a job: `CONFIG` is validated here once (a wrong key, a loss-weight typo or a
# cross-section mismatch stops `snakemake -n` with a message naming the keys). When the run starts, the
# resolved whole is written to LAYOUT.config_file() (named by its content digest) and every job reads
# it with `--config`. A rule's rerun trigger is its `sections` param: the digest of the config parts its
# outputs depend on (mutdet.config.job_sections), so editing an unrelated section reruns nothing. The
# config file is passed as a pathlib.Path param: Snakemake compares only plain values (str, numbers,
# containers) between runs, so the file's name, which changes with any edit, triggers nothing itself.
import functools
import json
import shlex
import sys
from pathlib import Path

from mutdet.config import from_dict
from mutdet.layout import Layout

CONFIG = from_dict(config, "config")
LAYOUT = Layout(CONFIG)
RESULTS = str(CONFIG.results)
LOGS = str(LAYOUT.logs_dir())
CONFIG_FILE = LAYOUT.config_file()
# The running interpreter's mutdet (the .venv); under --use-conda the env's python resolves it.
MUTDET = (
    "python -m mutdet"
    if "conda" in {str(m).lower() for m in workflow.deployment_settings.deployment_method}
    else f"{sys.executable} -m mutdet"
)
# GPU rules run their command through the launcher (mutdet/engine/launch.py): it picks the job's GPUs
# (keeps SLURM's CUDA_VISIBLE_DEVICES, else claims free ones with lock files), runs torchrun for
# gpu > 1 (--torchrun) and passes SIGTERM on to the command.
LAUNCH = f"{MUTDET}.engine.launch"

NAME = r"[A-Za-z0-9][A-Za-z0-9_-]*"


wildcard_constraints:
    dataset=NAME,
    split=NAME,
    shard=r"\d+",
    fraction=r"(0?\.\d+|1\.0|1)",
    run=r"[A-Za-z0-9][A-Za-z0-9_~.=/-]*",
    init=NAME,
    epochs=r"\d+",
    seed=r"\d+",
    variant=NAME,


onstart:
    # Written once per configuration (its name is its content digest), atomically, before any job.
    if not CONFIG_FILE.is_file():
        from mutdet.io.atomic import write_text

        write_text(CONFIG_FILE, json.dumps(dict(CONFIG.raw), sort_keys=True, indent=1, default=str) + "\n")


def p(path):
    """A Layout path as the string Snakemake patterns use."""
    return str(path)


def sections(stage, **wildcards):
    """A rule's rerun trigger: the digest of the config parts its outputs depend on."""
    return lambda w: CONFIG.sections_digest(stage, **{k: w[v] for k, v in wildcards.items()})


def dataset_inputs(name, split=None):
    """Files a dataset's stages wait for: the generated-data manifest, or the split's list file."""
    ds = CONFIG.dataset(name)
    if ds.source != "files":
        return [str(ds.root / "MANIFEST.json")]
    if split is not None and ds.split(split).list is not None:
        return [str(ds.split(split).list)]
    return []


def raw_files(name, split, shard=None):
    """The raw image and label files of one shard (every shard: None) of a `files` dataset's split, so
    editing one reruns exactly the jobs that read it. Ids are listed (and checked) as the tile stage
    lists them; a missing image or label file is left to the stage's `on_bad_object` policy."""
    per_image = _raw_files_per_image(name, split)
    if not per_image:  # generated datasets (and empty splits): no listing, no import at DAG time
        return []
    from mutdet.io.datasets import shard_ids

    ids = list(per_image)
    if shard is not None:
        ids = shard_ids(ids, int(shard), CONFIG.dataset(name).shards)
    return [f for image_id in ids for f in per_image[image_id]]


@functools.cache
def _raw_files_per_image(name, split):
    """Sorted image id -> its existing image and label files; the split is listed once per DAG."""
    ds = CONFIG.dataset(name)
    if ds.source != "files":
        return {}
    from mutdet.io.datasets import LABEL_SUFFIX, find_image, list_image_ids

    sp = ds.split(split)
    files = {}
    for image_id in list_image_ids(sp.images, sp.list, ds.image_extensions):
        try:
            files[image_id] = [str(find_image(sp.images, image_id, ds.image_extensions))]
        except FileNotFoundError:
            files[image_id] = []
        label = sp.labels / f"{image_id}{LABEL_SUFFIX[ds.format]}"
        if label.is_file():
            files[image_id].append(str(label))
    return files


def split_tiles(dataset, split):
    """`tiles.parquet` of every shard of a split."""
    return [p(d / "tiles.parquet") for d in LAYOUT.split_tiles_dirs(dataset, split)]


def pretrain_files(kind):
    """Per-shard files of every `proposals.datasets` shard: kind is tiles | proposals | embeddings | targets."""
    path = {
        "tiles": LAYOUT.tiles_table,
        "proposals": lambda *s: LAYOUT.proposals_dir(*s) / "proposals.parquet",
        "embeddings": lambda *s: LAYOUT.embeddings_dir(*s) / "embeddings.parquet",
        "targets": LAYOUT.targets_file,
    }[kind]
    return [p(path(*shard)) for shard in LAYOUT.pretrain_shards()]


def all_tiles():
    return [p(LAYOUT.tiles_table(name, split, k)) for name, ds in CONFIG.datasets.items() for split in ds.splits
            for k in range(ds.shards)]


def all_fractions():
    return [p(LAYOUT.fractions_file(name, split, value)) for name, split in CONFIG.fractions.datasets
            for value in CONFIG.fractions.values]


def finetune_run(dataset):
    """The `finetune.runs` entry of a dataset (entries of one dataset share their splits)."""
    return next(r for r in CONFIG.finetune.runs if r.dataset == dataset)


def all_pretrain_variants():
    """Variants the sweep fine-tunes from, plus those of the loss-curve figure."""
    if not CONFIG.pretraining_needed():
        return []
    names = {i for r in CONFIG.finetune.runs for i in r.inits if i != "none"}
    names |= {v for v in CONFIG.pretrain.loss_curves.values() if v is not None}
    return sorted(names)


def loss_curve_variants():
    """(legend label, variant) of the loss-curve figure."""
    return [(f"{v} ({k} enhancement)", v) for k, v in CONFIG.pretrain.loss_curves.items() if v is not None]


def loss_curves_figure():
    return [p(LAYOUT.loss_curves_figure())] if loss_curve_variants() and CONFIG.pretraining_needed() else []


def all_finetune_metrics():
    return [p(LAYOUT.job_dir(job) / "metrics.json") for job in LAYOUT.finetune_jobs()]


def finetuned_datasets():
    return list(dict.fromkeys(r.dataset for r in CONFIG.finetune.runs))


@functools.cache
def tables_inputs():
    """What `mutdet tables` reads, as the JSON it takes: each run's (one per seed) metrics and tile detections, and the
    test tiles of every fine-tuned dataset; the same files are the rule's inputs."""
    runs = [{"dataset": j.dataset, "train_split": j.train_split, "split": j.split, "init": j.init,
             "fraction": j.fraction, "epochs": j.epochs, "seed": j.seed,
             "metrics": p(LAYOUT.job_dir(j) / "metrics.json"),
             "detections": p(LAYOUT.job_dir(j) / "detections_tiles.parquet")} for j in LAYOUT.finetune_jobs()]
    test_tiles = {d: [p(t) for t in LAYOUT.split_tiles_dirs(d, finetune_run(d).test_split)] for d in finetuned_datasets()}
    return {"runs": runs, "test_tiles": test_tiles}


def table_outputs():
    tables = LAYOUT.tables_dir()
    names = {}
    for d in finetuned_datasets():
        for table in ("main", "low_data", "ablation"):
            names[f"{table}_{d}"] = report(
                p(tables / f"{table}_{d}.csv"),
                caption=f"../report/{table}.rst",
                category="Tables",
                subcategory=d,
                labels={"table": table, "dataset": d},
            )
            names[f"{table}_{d}_md"] = p(tables / f"{table}_{d}.md")
            names[f"{table}_{d}_tex"] = p(tables / f"{table}_{d}.tex")
        names[f"runs_{d}"] = p(tables / f"runs_{d}.csv")  # one row per job (seed): the values the cells aggregate
        names[f"ap50_vs_fraction_{d}"] = report(
            p(tables / f"ap50_vs_fraction_{d}.png"),
            caption="../report/ap50_vs_fraction.rst",
            category="Figures",
            subcategory=d,
            labels={"figure": "AP50 vs data fraction", "dataset": d},
        )
        names[f"detections_{d}"] = report(
            p(tables / f"detections_{d}.png"),
            caption="../report/detections.rst",
            category="Figures",
            subcategory=d,
            labels={"figure": "detections", "dataset": d},
        )
    return names
