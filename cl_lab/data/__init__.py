"""Datasets and task streams."""

from cl_lab.data.datasets import DATASETS, Dataset, load, mnist_subset
from cl_lab.data.streams import (
                                 SCENARIOS,
                                 Stream,
                                 Task,
                                 joint,
                                 permuted,
                                 permuted_mnist,
                                 rotate_images,
                                 rotated,
                                 rotated_mnist,
                                 split,
                                 split_mnist,
)
from cl_lab.data.synthetic import two_blob_tasks

__all__ = ["DATASETS", "SCENARIOS", "Dataset", "Stream", "Task", "joint", "load", "mnist_subset", "permuted",
           "permuted_mnist", "rotate_images", "rotated", "rotated_mnist", "split", "split_mnist",
           "two_blob_tasks"]
