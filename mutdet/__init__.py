"""mutdet: MutDet detection pre-training for oriented DETR detectors, as a Snakemake pipeline."""
__version__ = "0.1.0"
