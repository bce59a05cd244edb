"""Input: the embedded tfds datasets and the grain pipeline (see `pipeline`)."""

from randlora_jax.data.common import DEFAULT_DATA_DIR, DataError
from randlora_jax.data.pipeline import (
    NORMALIZATION, Subset, center_crop_resize, data_source, eval_batches, eval_transform,
    fraction_indices, get_builder, kshot_indices, label_info, labels_of, normalize, num_classes,
    random_resized_crop, train_dataset, train_transform)

__all__ = [
    "DEFAULT_DATA_DIR", "NORMALIZATION", "DataError", "Subset", "center_crop_resize",
    "data_source", "eval_batches", "eval_transform", "fraction_indices", "get_builder",
    "kshot_indices", "label_info", "labels_of", "normalize", "num_classes",
    "random_resized_crop", "train_dataset", "train_transform",
]
