"""Datasets as uint8 tensors, mini-batches on the device, and batched augmentation."""

from advcl_cli.data.batches import Batches
from advcl_cli.data.registry import ImageData, dataset_names, default_data_dir, load_dataset, num_classes_of

__all__ = ["Batches", "ImageData", "dataset_names", "default_data_dir", "load_dataset", "num_classes_of"]
