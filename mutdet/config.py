"""The pipeline configuration: one YAML file, one JSON schema, frozen dataclasses.

The schema (``workflow/schemas/config.schema.yaml``) is the single source of truth for keys, types,
descriptions and defaults. :func:`validate_config` fills the defaults and raises :class:`ConfigError`
naming every offending key; :func:`load_config` turns the result into :class:`Config`. Only the
Snakefile and ``mutdet.stages`` read configs; library modules take plain arguments.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration that does not match the schema; the message names the key(s)."""


def load_schema() -> dict:
    if not SCHEMA_PATH.is_file():
        raise ConfigError(f"config schema not found at {SCHEMA_PATH} (mutdet must run from its source tree)")
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def _default_filling_validator():
    base = jsonschema.Draft7Validator
    validate_properties = base.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for name, sub in props.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, props, instance, schema)

    return jsonschema.validators.extend(base, {"properties": properties})


_Validator = _default_filling_validator()


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate_config(raw: Mapping[str, Any] | None, source: str = "config") -> dict:
    """Validate ``raw`` against the schema and return a copy with every default filled in.

    Raises:
        ConfigError: listing each problem as ``<source>: <key.path>: <message>``.
    """
    instance = copy.deepcopy(dict(raw or {}))
    validator = _Validator(load_schema())
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{source}: {_key_path(e)}: {e.message}" for e in errors]
        raise ConfigError("invalid configuration\n  " + "\n  ".join(lines))
    return instance


@dataclass(frozen=True)
class TilingConfig:
    enabled: bool
    size: int
    gap: int
    rates: tuple[float, ...]
    iof_threshold: float
    img_rate_threshold: float
    pad_value: tuple[int, int, int]  # RGB

    def __post_init__(self):
        if self.enabled and self.gap >= self.size:
            raise ConfigError(f"tiling.gap ({self.gap}) must be smaller than tiling.size ({self.size})")


@dataclass(frozen=True)
class SplitConfig:
    name: str
    images: Path  # folder
    labels: Path  # folder
    list: Path | None  # file of image ids, or None for every image in `images`


@dataclass(frozen=True)
class SyntheticConfig:
    num_train: int
    num_test: int
    image_size: int
    seed: int


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    source: str  # files | synthetic | deepforest
    root: Path
    format: str  # dota | dior | voc
    classes: tuple[str, ...]
    class_aliases: Mapping[str, str]  # lower-cased label name -> class name
    image_extensions: tuple[str, ...]
    splits: Mapping[str, SplitConfig]
    shards: int
    tiling: TilingConfig
    synthetic: SyntheticConfig

    def split(self, name: str) -> SplitConfig:
        if name not in self.splits:
            raise ConfigError(f"datasets.{self.name}.splits: no split named {name!r} (have {sorted(self.splits)})")
        return self.splits[name]


@dataclass(frozen=True)
class SamConfig:
    model_type: str  # vit_h | vit_l | vit_b
    checkpoint: Path | None
    device: str  # auto | cpu | cuda | cuda:N
    precision: str  # fp32 | bf16 | fp16
    generator: Mapping[str, Any]  # SamAutomaticMaskGenerator keyword arguments


@dataclass(frozen=True)
class SelectiveSearchConfig:
    mode: str  # fast | quality | single
    resize: int
    max_boxes: int


@dataclass(frozen=True)
class GraphConfig:
    sigma: float
    k: float
    min_size: int
    resize: int
    min_area: float
    max_area_fraction: float


@dataclass(frozen=True)
class ProposalsConfig:
    datasets: tuple[tuple[str, str], ...]  # (dataset, split) pairs
    method: str  # sam | selective_search | graph
    max_per_tile: int
    on_bad_tile: str  # report | error
    checkpoint_every: int
    sam: SamConfig
    selective_search: SelectiveSearchConfig
    graph: GraphConfig

    def method_params(self) -> dict:
        """The parameters that determine the proposals of the configured method (hashed into paths)."""
        params = {"method": self.method, "max_per_tile": self.max_per_tile}
        if self.method == "sam":
            params.update(model_type=self.sam.model_type, checkpoint=str(self.sam.checkpoint),
                          precision=self.sam.precision, generator=dict(self.sam.generator))
        else:
            params.update(vars(getattr(self, self.method)))
        return params


@dataclass(frozen=True)
class EmbeddingConfig:
    backbone: str
    weights: str  # imagenet | none | path
    batch_size: int
    workers: int
    device: str
    precision: str
    context: float
    input_size: int
    crop_size: int
    checkpoint_every: int


@dataclass(frozen=True)
class ClusterConfig:
    pca_dim: int
    k: int
    max_fit_samples: int
    max_iter: int


def _train_kwargs(train: Mapping[str, Any], epochs: int) -> dict:
    """TrainConfig fields of a run of ``epochs``: lr decay at 8/9 of the schedule unless configured
    (32 of 36, as the paper)."""
    kwargs = dict(train)
    if kwargs.get("lr_decay_epochs") is None:
        kwargs["lr_decay_epochs"] = [round(epochs * 8 / 9)]
    return {**kwargs, "epochs": epochs}


@dataclass(frozen=True)
class FinetuneRun:
    dataset: str
    train_split: str
    test_split: str
    inits: tuple[str, ...]
    fractions: tuple[float, ...]
    epochs: tuple[int, ...]


@dataclass(frozen=True)
class FinetuneConfig:
    runs: tuple[FinetuneRun, ...]
    input_size: int | None
    flip_probability: float
    device: str
    wandb_mode: str | None
    merge_iou: float
    num_select: int
    score_threshold: float
    eval_batch_size: int
    model: Mapping[str, Any]  # build_detector keywords
    train: Mapping[str, Any]  # TrainConfig fields (without epochs and seed)
    loss: Mapping[str, Any]  # build_criterion keywords

    def train_kwargs(self, epochs: int) -> dict:
        """TrainConfig fields for a run of ``epochs``."""
        return _train_kwargs(self.train, epochs)


@dataclass(frozen=True)
class PretrainConfig:
    variants: Mapping[str, Any]  # name -> mutdet.variants.PretrainVariant
    epochs: int
    input_size: int | None
    max_boxes: int | None
    flip_probability: float
    freeze_backbone: bool
    temperature: float
    align_weight: float
    enhancement: Mapping[str, Any]
    encoder_head_hidden: int
    device: str
    wandb_mode: str | None
    loss_curves: Mapping[str, str | None]
    train: Mapping[str, Any]
    loss: Mapping[str, Any]

    def train_kwargs(self) -> dict:
        """TrainConfig fields of the pre-training run."""
        return _train_kwargs(self.train, self.epochs)


@dataclass(frozen=True)
class FractionsConfig:
    datasets: tuple[tuple[str, str], ...]  # (dataset, split) pairs
    values: tuple[float, ...]
    nested: bool


@dataclass(frozen=True)
class Config:
    results: Path
    seed: int
    on_bad_object: str  # error | skip
    datasets: Mapping[str, DatasetConfig] = field(default_factory=dict)
    proposals: ProposalsConfig | None = None
    fractions: FractionsConfig | None = None
    embedding: EmbeddingConfig | None = None
    cluster: ClusterConfig | None = None
    finetune: FinetuneConfig | None = None
    pretrain: PretrainConfig | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise ConfigError(f"datasets: no dataset named {name!r} (have {sorted(self.datasets)})")
        return self.datasets[name]


def _dataset(name: str, d: dict) -> DatasetConfig:
    root = Path(d["root"])
    classes = tuple(d["classes"])
    lowered = [c.lower() for c in classes]
    if len(set(lowered)) != len(lowered):
        raise ConfigError(f"datasets.{name}.classes: duplicate class names (case-insensitive): {list(classes)}")
    aliases = {}
    for alias, target in d["class_aliases"].items():
        if target.lower() not in lowered:
            raise ConfigError(f"datasets.{name}.class_aliases.{alias}: {target!r} is not one of classes {list(classes)}")
        aliases[alias.lower()] = classes[lowered.index(target.lower())]
    splits = {}
    for split_name, s in d["splits"].items():
        splits[split_name] = SplitConfig(
            name=split_name,
            images=root / (s["images"] or d["images"]),
            labels=root / (s["labels"] or d["labels"]),
            list=None if s["list"] is None else root / s["list"],
        )
    t = d["tiling"]
    return DatasetConfig(
        name=name,
        source=d["source"],
        root=root,
        format=d["format"],
        classes=classes,
        class_aliases=MappingProxyType(aliases),
        image_extensions=tuple(d["image_extensions"]),
        splits=MappingProxyType(splits),
        shards=d["shards"],
        tiling=TilingConfig(
            enabled=t["enabled"], size=t["size"], gap=t["gap"], rates=tuple(float(r) for r in t["rates"]),
            iof_threshold=float(t["iof_threshold"]), img_rate_threshold=float(t["img_rate_threshold"]),
            pad_value=tuple(t["pad_value"]),
        ),
        synthetic=SyntheticConfig(**d["synthetic"]),
    )


def _split_refs(refs: list[str], key: str, datasets: Mapping[str, DatasetConfig]) -> tuple[tuple[str, str], ...]:
    """``["dataset/split", ...]`` -> pairs, each checked against the declared datasets and splits."""
    pairs = []
    for ref in refs:
        name, split = ref.split("/")
        if name not in datasets:
            raise ConfigError(f"{key}: {ref!r} names no dataset (have {sorted(datasets)})")
        if split not in datasets[name].splits:
            raise ConfigError(f"{key}: {ref!r}: dataset {name!r} has no split {split!r} (have {sorted(datasets[name].splits)})")
        pairs.append((name, split))
    return tuple(pairs)


def _proposals(p: dict, datasets: Mapping[str, DatasetConfig]) -> ProposalsConfig:
    pairs = _split_refs(p["datasets"], "proposals.datasets", datasets)
    sam = p["sam"]
    return ProposalsConfig(
        datasets=pairs, method=p["method"], max_per_tile=p["max_per_tile"], on_bad_tile=p["on_bad_tile"],
        checkpoint_every=p["checkpoint_every"],
        sam=SamConfig(model_type=sam["model_type"], checkpoint=None if sam["checkpoint"] is None else Path(sam["checkpoint"]),
                      device=sam["device"], precision=sam["precision"], generator=MappingProxyType(dict(sam["generator"]))),
        selective_search=SelectiveSearchConfig(**p["selective_search"]),
        graph=GraphConfig(**p["graph"]),
    )


def _finetune(f: dict, datasets: Mapping[str, DatasetConfig]) -> FinetuneConfig:
    runs = []
    for k, r in enumerate(f["runs"]):
        if r["dataset"] not in datasets:
            raise ConfigError(f"finetune.runs.{k}.dataset: {r['dataset']!r} names no dataset (have {sorted(datasets)})")
        for key in ("train_split", "test_split"):
            if r[key] not in datasets[r["dataset"]].splits:
                raise ConfigError(f"finetune.runs.{k}.{key}: dataset {r['dataset']!r} has no split {r[key]!r}")
        earlier = next((run for run in runs if run.dataset == r["dataset"]), None)
        if earlier is not None and (earlier.train_split, earlier.test_split) != (r["train_split"], r["test_split"]):
            raise ConfigError(f"finetune.runs.{k}: dataset {r['dataset']!r} is fine-tuned on {earlier.train_split!r} and "
                              f"tested on {earlier.test_split!r} by an earlier entry; entries of one dataset (several "
                              f"sweeps whose union is run) must use the same splits")
        runs.append(FinetuneRun(dataset=r["dataset"], train_split=r["train_split"], test_split=r["test_split"],
                                inits=tuple(r["inits"]), fractions=tuple(float(v) for v in r["fractions"]),
                                epochs=tuple(r["epochs"])))
    scalars = {k: f[k] for k in ("input_size", "flip_probability", "device", "wandb_mode", "merge_iou",
                                 "num_select", "score_threshold", "eval_batch_size")}
    return FinetuneConfig(runs=tuple(runs), **scalars, model=MappingProxyType(dict(f["model"])),
                          train=MappingProxyType(dict(f["train"])), loss=MappingProxyType(dict(f["loss"])))


def _pretrain(p: dict, finetune: FinetuneConfig, proposals: ProposalsConfig) -> PretrainConfig:
    from mutdet.variants import variant_from_dict

    variants = {}
    for name, flags in p["variants"].items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or name == "none":
            raise ConfigError(f"pretrain.variants.{name}: a variant name is letters, digits, '_' and '-', not 'none'")
        try:
            variants[name] = variant_from_dict(name, flags)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    for k, run in enumerate(finetune.runs):
        for init in run.inits:
            if init != "none" and init not in variants:
                raise ConfigError(f"finetune.runs.{k}.inits: {init!r} is neither `none` nor a pretrain.variants name "
                                  f"(have {sorted(variants)})")
    inits = sorted({i for run in finetune.runs for i in run.inits if i != "none"})
    if inits and not proposals.datasets:
        raise ConfigError(f"finetune.runs: inits {inits} need pre-training, which runs on the tiles of "
                          f"proposals.datasets, and that list is empty")
    for key, name in p["loss_curves"].items():
        if name is not None and name not in variants:
            raise ConfigError(f"pretrain.loss_curves.{key}: {name!r} is not a pretrain.variants name "
                              f"(have {sorted(variants)})")
    scalars = {k: p[k] for k in ("epochs", "input_size", "max_boxes", "flip_probability", "freeze_backbone",
                                 "temperature", "align_weight", "encoder_head_hidden", "device", "wandb_mode")}
    return PretrainConfig(variants=MappingProxyType(variants), **scalars,
                          enhancement=MappingProxyType(dict(p["enhancement"])),
                          loss_curves=MappingProxyType(dict(p["loss_curves"])),
                          train=MappingProxyType(dict(p["train"])), loss=MappingProxyType(dict(p["loss"])))


def from_dict(raw: Mapping[str, Any] | None, source: str = "config") -> Config:
    """Validate a config mapping and build the frozen :class:`Config`."""
    d = validate_config(raw, source)
    datasets = MappingProxyType({name: _dataset(name, ds) for name, ds in d["datasets"].items()})
    finetune = _finetune(d["finetune"], datasets)
    proposals = _proposals(d["proposals"], datasets)
    return Config(
        results=Path(d["results"]),
        seed=d["seed"],
        on_bad_object=d["on_bad_object"],
        datasets=datasets,
        proposals=proposals,
        fractions=FractionsConfig(datasets=_split_refs(d["fractions"]["datasets"], "fractions.datasets", datasets),
                                  values=tuple(float(v) for v in d["fractions"]["values"]),
                                  nested=d["fractions"]["nested"]),
        embedding=EmbeddingConfig(**d["embedding"]),
        cluster=ClusterConfig(**d["cluster"]),
        finetune=finetune,
        pretrain=_pretrain(d["pretrain"], finetune, proposals),
        raw=MappingProxyType(d),
    )


def load_config(path_or_json: str | Path) -> Config:
    """Load a config from a YAML/JSON file, or from an inline JSON object (text starting with ``{``)."""
    text = str(path_or_json)
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"inline config: invalid JSON: {exc}") from None
        return from_dict(raw, "inline config")
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return from_dict(raw, str(path))
