"""Runtime kernel tests run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before kvc.runtime.kernels
is first imported; each test gets a torch.Generator seeded from its own node id.
"""

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture
def generator(request):
    """A CPU generator whose seed differs across tests and parametrised cases but not across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small tensor ops per step: on a shared CPU, waking a second thread costs more than it saves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
