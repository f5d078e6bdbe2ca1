import os

import torch

if not torch.cuda.is_available():  # as `import braze` does: on a GPU, `pytest -m gpu` runs compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["BRAZE_CACHE"] = "0"  # no compile cache in ~/.cache (tests/test_compile_cache.py turns it on in a tmp dir)

import pytest  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; the CPU twin runs under the Triton interpreter")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
