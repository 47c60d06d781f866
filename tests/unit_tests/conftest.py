"""Fixtures shared by the unit tests' training runs (test_training, test_resume)."""
import pytest

from tests.dflash_testing import pattern_dataset, tiny_target_dir


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny random target checkpoint (`synthetic.tiny_target_dir`)."""
    return tiny_target_dir(tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train, held-out) learnable pattern conversations for `target`."""
    d = tmp_path_factory.mktemp("data")
    return pattern_dataset(d / "train", 64, 48, seed=1), pattern_dataset(d / "valid", 8, 48, seed=2)
