"""Data sources, splits and the training data set, one concept per module:

* :mod:`~training.data.samples`: :class:`Sample` (one labelled image on disk) and counts.
* :mod:`~training.data.sources`: ``load_source`` / ``load_sources`` understand the four
  sources of the product contract and return a flat list of samples.
* :mod:`~training.data.splits`: ``split_samples`` turns it into train/val/test (keeping given
  splits, otherwise stratified by label and grouped by patient so no patient leaks).
* :mod:`~training.data.dataset`: ``XrayDataset`` decodes through :mod:`training.imaging` and
  :mod:`training.preprocess` (the same code the service uses), skipping unreadable files
  with one warning; ``balanced_sampler`` builds batches that contain every class (and
  ``group_ids``, every label x source cell), because COVID-19 is about 2% of the images.

Imports flow down the list. The public names are re-exported here, so
``from training.data import load_sources`` keeps working; code that needs one concept may
import the one module it needs.
"""

from training.data.dataset import XrayDataset, balanced_sampler, group_ids
from training.data.samples import (
    SPLITS,
    DataSourceError,
    Sample,
    class_counts,
    class_names,
    summarise,
)
from training.data.sources import (
    ACCEPTED_SOURCES,
    IMAGE_EXTENSIONS,
    load_source,
    load_sources,
    source_name,
)
from training.data.splits import split_samples

__all__ = [
    "ACCEPTED_SOURCES",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DataSourceError",
    "Sample",
    "XrayDataset",
    "balanced_sampler",
    "class_counts",
    "class_names",
    "group_ids",
    "load_source",
    "load_sources",
    "source_name",
    "split_samples",
    "summarise",
]
