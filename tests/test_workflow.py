"""The real workflow: lint, dry runs, a bad config, and a tiny end-to-end run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
TEST_CONFIG = REPO / ".test" / "config.yaml"

pytestmark = pytest.mark.workflow


def snakemake(*args, cwd=REPO, check=True):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_lint_is_clean():
    proc = snakemake("--lint")
    assert "Congratulations" in proc.stdout + proc.stderr


@pytest.mark.parametrize("configfile", [REPO / "config.yaml", TEST_CONFIG])
def test_dry_run_shows_one_job_per_shard(configfile, tmp_path):
    raw = yaml.safe_load(configfile.read_text())
    proc = snakemake("-n", "-d", str(tmp_path), "--configfile", str(configfile))
    counts = dict(line.split() for line in proc.stdout.split("Job stats:")[1].splitlines()[3:]
                  if len(line.split()) == 2 and line.split()[1].isdigit())
    splits = sum(ds["shards"] * len(ds["splits"]) for ds in raw["datasets"].values())
    assert int(counts["tile"]) == splits
    proposal_shards = sum(raw["datasets"][ref.split("/")[0]]["shards"] for ref in raw["proposals"]["datasets"])
    assert int(counts["propose"]) == int(counts["embed"]) == proposal_shards and int(counts["cluster"]) == 1
    runs = raw["finetune"]["runs"]
    jobs = {(r["dataset"], i, f, e, seed) for r in runs for i in r.get("inits", ["none"])
            for f in r.get("fractions", [1.0]) for e in r.get("epochs", [36])
            for seed in r.get("seeds") or [raw.get("seed", 42)]}  # entries of one dataset share their common jobs
    assert int(counts["finetune"]) == int(counts["evaluate"]) == len(jobs)
    variants = {i for (_, i, _, _, _) in jobs if i != "none"} | {
        v for v in raw.get("pretrain", {}).get("loss_curves", {"with": "mutdet"}).values() if v}
    assert int(counts["pretrain"]) == len(variants) and int(counts["tables"]) == 1


def test_dry_run_has_one_finetune_job_per_seed(tmp_path):
    """Two seeds: two fine-tuning (and merge, evaluate) jobs per (init, fraction, epochs) cell, each with its
    own folder, every seed reading the one fraction list file; pre-training and data jobs do not multiply."""
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    run = raw["finetune"]["runs"][0]
    cells = len(run["inits"]) * len(run["fractions"]) * len(run["epochs"])
    plans = {}
    for seeds in (None, [42, 7]):
        if seeds is not None:
            run["seeds"] = seeds
        config = tmp_path / f"seeds-{len(seeds or [])}.yaml"
        config.write_text(yaml.safe_dump(raw))
        plans[len(seeds or [1])] = snakemake("-n", "-p", "-d", str(tmp_path), "--configfile", str(config)).stdout
    one, two = job_counts(plans[1]), job_counts(plans[2])
    assert one["finetune"] == one["merge"] == one["evaluate"] == cells
    assert two["finetune"] == two["merge"] == two["evaluate"] == 2 * cells
    assert {k: v for k, v in two.items() if k not in ("finetune", "merge", "evaluate")} == {
        k: v for k, v in one.items() if k not in ("finetune", "merge", "evaluate")}
    commands = [line for line in plans[2].splitlines() if " -m mutdet finetune " in line]
    assert len(commands) == 2 * cells
    for seed in (42, 7):
        mine = [c for c in commands if f"--seed {seed} " in c]
        assert len(mine) == cells and all(f"/seed~{seed}/tiny/test" in c for c in mine)
    fractions = {c.split("--image-ids ")[1].split()[0] for c in commands}
    assert len(fractions) == len(run["fractions"])  # the seeds of a cell share the subset of the top-level seed


def test_bad_config_key_fails_dry_run_naming_the_key(tmp_path):
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    raw["datasets"]["tiny"]["tiling"]["sizee"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = snakemake("-n", "-d", str(tmp_path), "--configfile", str(bad), check=False)
    assert proc.returncode != 0
    assert "datasets.tiny.tiling: Additional properties are not allowed ('sizee' was unexpected)" in proc.stdout + proc.stderr


def test_invalid_yaml_in_the_default_config_names_line_and_column(tmp_path):
    (tmp_path / "config.yaml").write_text("results: results\ndatasets:\n  a: [1, 2\n  b: 3\n")
    proc = snakemake("-n", "-d", str(tmp_path), check=False)
    assert proc.returncode != 0
    assert "config.yaml: line 4, column 4: not valid YAML" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def job_counts(plan: str) -> dict[str, int]:
    """Rule -> number of jobs, from the `Job stats` table of a dry run."""
    counts = {}
    for line in plan.split("Job stats:")[1].splitlines()[3:]:
        if not line.strip():
            break
        name, count = line.split()
        counts[name] = int(count)
    counts.pop("total", None)
    return counts


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["finetune"].setdefault("loss", {}).update(loss_gioux=3.0),
     "finetune.loss: Additional properties are not allowed ('loss_gioux' was unexpected)"),
    (lambda raw: raw["pretrain"].setdefault("loss", {}).update(temprature=0.1),
     "pretrain.loss: Additional properties are not allowed ('temprature' was unexpected)"),
    (lambda raw: raw["cluster"].update(pca_dim=16),
     "cluster.pca_dim (16) must equal finetune.model.embed_dim (32)"),
    (lambda raw: raw["pretrain"].update(temperature=0.1), "pretrain.temperature: moved to pretrain.loss.temperature"),
])
def test_cross_section_mistakes_fail_the_dry_run_naming_the_keys(tmp_path, change, message):
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    change(raw)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = snakemake("-n", "-d", str(tmp_path), "--configfile", str(bad), check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / raw["results"]).exists()  # nothing ran, nothing was written


def test_no_op_rerun_and_params_trigger_of_a_recorded_state(tmp_path):
    """A finished-looking state (every output present, recorded by `--touch`): a rerun has nothing to do,
    and a changed config section still reruns its jobs for their params."""
    config = tmp_path / "config.yaml"
    config.write_text(TEST_CONFIG.read_text())
    base = ("-d", str(tmp_path), "--configfile", str(config))
    summary = snakemake("--summary", *base).stdout
    for line in summary.splitlines()[1:]:
        path = tmp_path / line.split("\t")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    snakemake("--touch", "--cores", "1", *base)
    rerun = snakemake("--cores", "1", *base)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    raw["datasets"]["tiny"]["tiling"]["gap"] = 32
    config.write_text(yaml.safe_dump(raw))
    plan = snakemake("-n", *base)
    assert "Params have changed since last execution" in plan.stdout + plan.stderr
    assert job_counts(plan.stdout + plan.stderr)["tile"] >= 1


def test_tiny_end_to_end_run_and_nothing_to_redo(tmp_path):
    snakemake("--cores", "2", "-d", str(tmp_path), "--configfile", str(TEST_CONFIG))
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    results = tmp_path / raw["results"]
    total_images = 0
    for split in ("train", "test"):
        for shard in range(raw["datasets"]["tiny"]["shards"]):
            out = results / "tiny" / "tiles" / split / f"shard-{shard}"
            summary = json.loads((out / "summary.json").read_text())
            total_images += summary["images"]
            assert (out / "tiles.parquet").is_file() and (out / "objects.parquet").is_file()
            assert summary["tiles"] == len(list((out / "images").rglob("*.png")))
            assert (results / "logs" / "tile" / "tiny" / split / f"shard-{shard}.log").is_file()
    syn = raw["datasets"]["tiny"]["synthetic"]
    assert total_images == syn["num_train"] + syn["num_test"]
    for fraction in raw["fractions"]["values"]:
        lines = (results / "tiny" / "fractions" / "train" / f"frac~{fraction}.txt").read_text().splitlines()
        ids = [l for l in lines if not l.startswith("#")]
        assert len(ids) == round(fraction * syn["num_train"]) and "# seed: 42" in lines
    run = raw["finetune"]["runs"][0]
    seed = f"seed~{raw['seed']}"  # no finetune.runs[].seeds: the top-level seed
    finetuned = results / "finetune" / "init~none" / "frac~1.0" / f"epochs~{run['epochs'][0]}" / seed / "tiny" / "test"
    metrics = json.loads((finetuned / "metrics.json").read_text())
    assert set(metrics["mean"]) >= {"AP50", "AP75"} and metrics["num_images"] == syn["num_test"]
    assert (finetuned / "checkpoint.pt").is_file() and (finetuned / "metrics.jsonl").is_file()
    pretrained = results / "pretrain"
    assert {p.parent.name for p in pretrained.rglob("checkpoint.pt")} == {"detreg", "mutdet"}
    assert next(pretrained.rglob("loss_curves.png")).stat().st_size > 0
    init = json.loads((results / "finetune" / "init~mutdet" / "frac~1.0" / f"epochs~{run['epochs'][0]}" / seed / "tiny"
                       / "test" / "init.json").read_text())
    assert init["variant"] == "mutdet" and any(k.startswith("mutual_enhancement.") for k in init["dropped"])
    tables = results / "tables"
    assert (tables / "index.md").is_file() and (tables / "detections_tiny.png").stat().st_size > 0
    header = (tables / "low_data_tiny.csv").read_text().splitlines()[0]
    assert header.startswith("data fraction") and "DETReg" in header and "MutDet" in header
    assert "(n=1)" in (tables / "low_data_tiny.csv").read_text()  # one seed per cell, said so
    per_seed = (tables / "runs_tiny.csv").read_text().splitlines()
    assert per_seed[0].startswith("init,fraction,epochs,seed,AP50") and len(per_seed) == 1 + len(run["inits"])
    snakemake("-d", str(tmp_path), "--configfile", str(TEST_CONFIG), "--report", str(results / "report.html"))
    assert (results / "report.html").stat().st_size > 100_000
    from mutdet.config import from_dict
    from mutdet.stages.outputs import describe

    listing = describe(from_dict({**raw, "results": str(results)}))
    assert "AP50" in listing and "not produced yet" not in listing and "not fitted yet" not in listing
    manifest = json.loads(next((results / "targets").rglob("manifest.json")).read_text())
    assert manifest["params"]["k"] == raw["cluster"]["k"] and manifest["pool"] > 0
    targets = sorted((results / "tiny" / "targets").rglob("targets.parquet"))
    assert len(targets) == raw["datasets"]["tiny"]["shards"]
    again = snakemake("-n", "--cores", "2", "-d", str(tmp_path), "--configfile", str(TEST_CONFIG))
    assert "Nothing to be done" in again.stdout + again.stderr
    # one more fraction in the sweep: only that fraction's fine-tuning jobs (and the tables) are new
    raw2 = json.loads(json.dumps(raw))
    raw2["finetune"]["runs"][0]["fractions"] = [0.5, 1.0]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw2))
    plan = snakemake("-n", "--cores", "2", "-d", str(tmp_path), "--configfile", str(changed)).stdout
    counts = job_counts(plan)
    inits = len(run["inits"])
    assert counts["finetune"] == counts["merge"] == counts["evaluate"] == inits and counts["tables"] == 1
    assert not {"tile", "propose", "embed", "cluster", "pretrain", "subset"} & set(counts)
    assert plan.count("fraction=0.5") == 2 * inits and "fraction=1.0" not in plan  # finetune and merge wildcards
    # one more seed: only that seed's fine-tuning jobs (and the tables); the existing seed's stay up to date
    raw_seeds = json.loads(json.dumps(raw))
    raw_seeds["finetune"]["runs"][0]["seeds"] = [raw["seed"], 7]
    changed.write_text(yaml.safe_dump(raw_seeds))
    plan = snakemake("-n", "--cores", "2", "-d", str(tmp_path), "--configfile", str(changed)).stdout
    counts = job_counts(plan)
    assert counts["finetune"] == counts["merge"] == counts["evaluate"] == inits and counts["tables"] == 1, counts
    assert not {"tile", "propose", "embed", "cluster", "pretrain", "subset"} & set(counts)
    assert plan.count("seed=7") == 2 * inits and f"seed={raw['seed']}" not in plan  # finetune and merge wildcards
    # a section only the tables read: only the tables (and the resolved config) are redone
    raw3 = json.loads(json.dumps(raw))
    raw3.setdefault("tables", {})["num_tiles"] = 2
    changed.write_text(yaml.safe_dump(raw3))
    counts = job_counts(snakemake("-n", "-d", str(tmp_path), "--configfile", str(changed)).stdout)
    assert set(counts) == {"tables", "resolved_config", "all"}, counts
    # a pre-training loss setting: both pre-training runs and what depends on them, nothing upstream
    raw4 = json.loads(json.dumps(raw))
    raw4["pretrain"].setdefault("loss", {})["temperature"] = 0.3
    changed.write_text(yaml.safe_dump(raw4))
    counts = job_counts(snakemake("-n", "-d", str(tmp_path), "--configfile", str(changed)).stdout)
    pretrained_inits = len([i for i in run["inits"] if i != "none"])
    assert counts["pretrain"] == 2 and counts["finetune"] == counts["evaluate"] == pretrained_inits, counts
    assert not {"tile", "propose", "embed", "cluster", "subset"} & set(counts)

    # Every job reads the whole validated config from the one file the run wrote, not a slice of it.
    from mutdet.config import load_config

    plan = snakemake("-n", "-p", "--forceall", "-d", str(tmp_path), "--configfile", str(TEST_CONFIG)).stdout
    commands = [line for line in plan.splitlines() if " -m mutdet " in line]
    config_files = {line.split("--config ")[1].split()[0] for line in commands if "--config " in line}
    assert len(config_files) == 1 and len(commands) == sum(job_counts(plan).values()) - 1  # all but `all`
    resolved = load_config(tmp_path / config_files.pop())
    expected = from_dict({**raw, "results": raw["results"]})
    assert dict(resolved.raw) == json.loads(json.dumps(dict(expected.raw)))

    # The evaluate rule on full-image detections made from the test split's own ground truth:
    # tile objects -> detections (tile frame) -> merge -> snakemake evaluates them.
    import numpy as np
    import pyarrow as pa

    from mutdet.io.artefacts import read_artefact, write_artefact
    from mutdet.stages import merge

    shards = [results / "tiny" / "tiles" / "test" / f"shard-{k}" for k in range(raw["datasets"]["tiny"]["shards"])]
    objects = read_artefact([s / "objects.parquet" for s in shards], "objects")
    dets = pa.table({"id": objects.column("tile_id"), "class_id": objects.column("class_id"),
                     "class_name": objects.column("class_name"),
                     "score": pa.array(np.linspace(1, 0.5, objects.num_rows), pa.float32()),
                     **{c: objects.column(c) for c in ("cx", "cy", "w", "h", "theta")}})
    write_artefact(dets, tmp_path / "tile_dets.parquet", "detections", {"frame": "tile"})
    run_dir = results / "oracle" / "tiny" / "test"
    merge.run(tmp_path / "tile_dets.parquet", [s / "tiles.parquet" for s in shards], run_dir / "detections.parquet")
    snakemake(str(run_dir.relative_to(tmp_path) / "metrics.json"),  # the target, before --configfile (nargs)
              "--cores", "1", "-d", str(tmp_path), "--configfile", str(TEST_CONFIG))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mean"]["AP50"] > 0.9 and (run_dir / "pr_curve.png").stat().st_size > 0


@pytest.mark.reliability
def test_editing_a_label_file_reruns_exactly_its_shard(tmp_path):
    """Raw images and labels are inputs Snakemake sees, per shard: an edit reruns the shard that holds it."""
    from mutdet.io.datasets import shard_ids
    from test_tiling import write_dataset

    ids = write_dataset(tmp_path / "data", n_images=4)
    config = tmp_path / "files.yaml"
    config.write_text(yaml.safe_dump({
        "results": str(tmp_path / "results"),
        "datasets": {"d": {"root": str(tmp_path / "data"), "format": "dota", "classes": ["ship"], "shards": 2,
                           "tiling": {"size": 256, "gap": 64}, "splits": {"train": {"list": "train.txt"}}}}}))
    targets = [str(tmp_path / "results" / "d" / "tiles" / "train" / f"shard-{k}" / "tiles.parquet") for k in (0, 1)]
    snakemake(*targets, "--cores", "2", "-d", str(tmp_path), "--configfile", str(config))  # targets first: --configfile takes several
    assert "Nothing to be done" in snakemake(*targets, "-n", "-d", str(tmp_path), "--configfile", str(config)).stdout
    edited = shard_ids(sorted(ids), 1, 2)[0]
    label = tmp_path / "data" / "labelTxt" / f"{edited}.txt"
    label.write_text(label.read_text() + "10 10 30 10 30 20 10 20 ship 0\n")
    proc = snakemake(*targets, "-n", "-d", str(tmp_path), "--configfile", str(config))
    assert "shard=1" in proc.stdout and "shard=0" not in proc.stdout, proc.stdout
