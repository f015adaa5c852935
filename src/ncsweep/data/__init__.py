"""Data sets as in-memory tensors, and the batching that feeds them to a model on any device.

- ``containers``: :class:`Split`, :class:`DataBundle`, :func:`batches` and, for an ensemble,
  :func:`member_batches`;
- ``tabular``: scikit-learn's digits, a Gaussian mixture, the UFM's sample indices (one count
  per class, or one for all);
- ``images`` and ``files``: torchvision's image sets read offline, ImageFolder trees;
- ``image_inputs``: how stored images become model inputs (``ImageView``, ``FileSource``);
- ``variants``: class subsets, subsampling, imbalance, label noise and random labels, one
  implementation for every data set with inputs, with what was realised in ``info``.

Every builder returns a :class:`DataBundle`; its ``num_classes`` and ``input_shape`` are checked
against what the config declared, so a dry run can size a model without the data.
"""

from ncsweep.data.containers import DataBundle, Split, batches, member_batches
from ncsweep.data.files import DatasetNotFound
from ncsweep.data.image_inputs import FileSource, ImageView
from ncsweep.data.images import FORMATS, load_images
from ncsweep.data.tabular import load_digits, make_synthetic, make_ufm
from ncsweep.data.variants import (
    IMBALANCE_PROFILES,
    NOISE_KINDS,
    Variants,
    add_label_noise,
    imbalance_counts,
    make_imbalanced,
    minority_classes,
    noise_rate,
    randomise_labels,
    select_classes,
    subsample_per_class,
)

__all__ = [
    "FORMATS", "IMBALANCE_PROFILES", "NOISE_KINDS", "DataBundle", "DatasetNotFound",
    "FileSource", "ImageView", "Split", "Variants", "add_label_noise", "batches",
    "imbalance_counts", "load_digits", "load_images", "make_imbalanced", "make_synthetic",
    "make_ufm", "member_batches", "minority_classes", "noise_rate", "randomise_labels",
    "select_classes", "subsample_per_class",
]
