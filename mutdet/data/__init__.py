"""Training-data selection: data-fraction subsets of image ids (``fractions``)."""
from mutdet.data.fractions import Subset, fraction_subset, format_subset, subset_size, write_subset

__all__ = ["Subset", "fraction_subset", "format_subset", "subset_size", "write_subset"]
