# Shared set-up: validated config, the mutdet command, output layout, targets.
import functools
import json
import shlex
import sys

from mutdet.config import from_dict
from mutdet.stages.layout import (
    FINETUNE_DIR,
    LOGS_DIR,
    PRETRAIN_RUN_DIR,
    TABLES_DIR,
    TILES_DIR,
    embedding_tag,
    pretrain_dir,
    proposals_tag,
)

# Validates against workflow/schemas/config.schema.yaml and fills defaults; a wrong key or type stops
# here (also under `snakemake -n`) with a message naming the key.
CONFIG = from_dict(config, "config")
RESULTS = str(CONFIG.results)
LOGS = f"{RESULTS}/{LOGS_DIR}"
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
# Tags of the parameters that determine proposals and embeddings (folder names; see pretrain_data.smk).
PROPOSALS_TAG = proposals_tag(CONFIG)
EMBED_TAG = embedding_tag(CONFIG)


wildcard_constraints:
    dataset=NAME,
    split=NAME,
    shard=r"\d+",
    fraction=r"(0?\.\d+|1\.0|1)",
    run=r"[A-Za-z0-9][A-Za-z0-9_~.=/-]*",
    ptag=NAME,
    init=NAME,
    epochs=r"\d+",
    etag=NAME,
    variant=NAME,


def dataset_config_json(name, seed=False):
    """The part of the config one dataset's jobs depend on (a params change reruns just them)."""
    raw = CONFIG.raw
    part = {"results": raw["results"], "on_bad_object": raw["on_bad_object"], "datasets": {name: raw["datasets"][name]}}
    if seed:
        part["seed"] = raw["seed"]
    return json.dumps(part, sort_keys=True)


def pretrain_config_json(name):
    """Config part of the per-shard pre-training data jobs of one dataset."""
    raw = CONFIG.raw
    part = json.loads(dataset_config_json(name))
    part.update(proposals=raw["proposals"], embedding=raw["embedding"])
    return json.dumps(part, sort_keys=True)


def pretrain_shard_files(kind):
    """Per-shard files of every `proposals.datasets` split: kind is proposals | embeddings | targets."""
    return [
        str(pretrain_dir(RESULTS, kind, name, split, shard, CONFIG) / f"{kind}.parquet")
        for name, split in CONFIG.proposals.datasets
        for shard in range(CONFIG.dataset(name).shards)
    ]


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
    from mutdet.io.datasets import shard_ids

    per_image = _raw_files_per_image(name, split)
    ids = list(per_image)
    if shard is not None:
        ids = shard_ids(ids, int(shard), CONFIG.dataset(name).shards)
    return [f for image_id in ids for f in per_image[image_id]]


@functools.cache
def _raw_files_per_image(name, split):
    """Sorted image id -> its existing image and label files; the split is listed once per DAG."""
    from mutdet.io.datasets import LABEL_SUFFIX, find_image, list_image_ids

    ds = CONFIG.dataset(name)
    if ds.source != "files":
        return {}
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


def tiles_path(dataset, split, shard, name):
    return f"{RESULTS}/{TILES_DIR.format(dataset=dataset, split=split, shard=shard)}/{name}"


def all_tiles():
    return [
        tiles_path(name, split, shard, "tiles.parquet")
        for name, ds in CONFIG.datasets.items()
        for split in ds.splits
        for shard in range(ds.shards)
    ]


def all_fractions():
    return [
        f"{RESULTS}/{name}/fractions/{split}/frac~{value}.txt"
        for name, split in CONFIG.fractions.datasets
        for value in CONFIG.fractions.values
    ]


def finetune_run(dataset):
    """The `finetune.runs` entry of a dataset."""
    return next(r for r in CONFIG.finetune.runs if r.dataset == dataset)


def finetune_tiles(dataset, split):
    return [tiles_path(dataset, split, shard, "tiles.parquet") for shard in range(CONFIG.dataset(dataset).shards)]


def finetune_config_json(name):
    """Config part of one dataset's fine-tuning jobs: not the sweep itself (`runs`), so adding a
    fraction, an init or a schedule leaves the other jobs' parameters unchanged."""
    part = json.loads(dataset_config_json(name, seed=True))
    part["finetune"] = {**CONFIG.raw["finetune"], "runs": []}
    return json.dumps(part, sort_keys=True)


def pretrain_run_dir(variant):
    run_dir = PRETRAIN_RUN_DIR.format(ptag=PROPOSALS_TAG, etag=EMBED_TAG, variant=variant)
    return f"{RESULTS}/{run_dir}"


def pretrain_checkpoint(variant):
    return f"{pretrain_run_dir(variant)}/checkpoint.pt"


def pretrain_variant_json(variant):
    """Config part of one variant's pre-training job: its own flags, the shared settings and the
    detector shape (`finetune.model`); other variants and the sweep do not enter."""
    raw = CONFIG.raw
    if variant not in raw["pretrain"]["variants"]:
        raise ValueError(f"pretrain: no variant {variant!r} in pretrain.variants (have {sorted(raw['pretrain']['variants'])})")
    pretrain = {**raw["pretrain"], "variants": {variant: raw["pretrain"]["variants"][variant]},
                "loss_curves": {"with": None, "without": None}}
    part = {"seed": raw["seed"], "finetune": {"model": raw["finetune"]["model"]}, "pretrain": pretrain}
    return json.dumps(part, sort_keys=True)


def pretrain_tiles():
    """Tiles folders' `tiles.parquet` of every pre-training shard (the order of pretrain_shard_files)."""
    return [
        tiles_path(name, split, shard, "tiles.parquet")
        for name, split in CONFIG.proposals.datasets
        for shard in range(CONFIG.dataset(name).shards)
    ]


def finetune_init_inputs(init):
    return [] if init == "none" else [pretrain_checkpoint(init)]


def all_pretrain_variants():
    """Variants the sweep fine-tunes from, plus those of the loss-curve figure."""
    names = {i for r in CONFIG.finetune.runs for i in r.inits if i != "none"}
    names |= {v for v in CONFIG.pretrain.loss_curves.values() if v is not None}
    return sorted(names)


def loss_curves_figure():
    lc = CONFIG.pretrain.loss_curves
    if lc["with"] is None or not CONFIG.proposals.datasets:
        return []
    return [f"{RESULTS}/pretrain/{PROPOSALS_TAG}/{EMBED_TAG}/loss_curves.png"]


def finetune_dir(run, init, fraction, epochs):
    return FINETUNE_DIR.format(init=init, fraction=fraction, epochs=epochs, dataset=run.dataset, split=run.test_split)


def all_finetune_metrics():
    """Every job of the sweep: the union of the `finetune.runs` entries (shared jobs once)."""
    paths = [
        f"{RESULTS}/{finetune_dir(r, init, fraction, epochs)}/metrics.json"
        for r in CONFIG.finetune.runs
        for init in r.inits
        for fraction in r.fractions
        for epochs in r.epochs
    ]
    return list(dict.fromkeys(paths))


def finetuned_datasets():
    return list(dict.fromkeys(r.dataset for r in CONFIG.finetune.runs))


def table_outputs():
    names = {}
    for d in finetuned_datasets():
        for table in ("main", "low_data", "ablation"):
            names[f"{table}_{d}"] = report(
                f"{RESULTS}/{TABLES_DIR}/{table}_{d}.csv",
                caption=f"../report/{table}.rst",
                category="Tables",
                subcategory=d,
                labels={"table": table, "dataset": d},
            )
            names[f"{table}_{d}_md"] = f"{RESULTS}/{TABLES_DIR}/{table}_{d}.md"
            names[f"{table}_{d}_tex"] = f"{RESULTS}/{TABLES_DIR}/{table}_{d}.tex"
        names[f"ap50_vs_fraction_{d}"] = report(
            f"{RESULTS}/{TABLES_DIR}/ap50_vs_fraction_{d}.png",
            caption="../report/ap50_vs_fraction.rst",
            category="Figures",
            subcategory=d,
            labels={"figure": "AP50 vs data fraction", "dataset": d},
        )
        names[f"detections_{d}"] = report(
            f"{RESULTS}/{TABLES_DIR}/detections_{d}.png",
            caption="../report/detections.rst",
            category="Figures",
            subcategory=d,
            labels={"figure": "detections", "dataset": d},
        )
    return names
