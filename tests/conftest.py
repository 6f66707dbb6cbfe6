import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_FMNIST = os.path.join(ROOT, "..", "shared", "data", "FashionMNIST")


@pytest.fixture(scope="session")
def data_dir():
    """The project's data/ folder with the real Fashion-MNIST (copied from ../shared/data if absent)."""
    path = os.path.join(ROOT, "data")
    raw = os.path.join(path, "FashionMNIST", "raw")
    if not os.path.isdir(raw):
        if not os.path.isdir(SHARED_FMNIST):
            pytest.fail("Fashion-MNIST is missing: copy it to data/FashionMNIST/raw (see README)")
        shutil.copytree(SHARED_FMNIST, os.path.join(path, "FashionMNIST"))
    return path
