import os

import pytest
import torch
from hypothesis import settings

# Triton kernels (later) are tested on the CPU through the interpreter; it must be set before any
# @triton.jit runs, so it is set here, before the package is imported, when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The backend choice under test is always explicit; a stray override would change what runs.
os.environ.pop("QSTAR_BACKEND", None)
os.environ.pop("QSTAR_LM_HEAD_BACKEND", None)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Hypothesis explores new examples on every developer run; in CI it replays a fixed sequence, so
# that a landing never hinges on a lucky draw (failures found locally are kept in .hypothesis/).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_report_header(config):
    import qstar_kernels

    return (
        f"torch {torch.__version__} (cuda {torch.version.cuda}), "
        f"qstar_kernels backends on cpu: {qstar_kernels.available_backends('cpu')}, "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
    )


@pytest.fixture
def seed(request):
    """A fresh but reproducible seed per test: derived from the test id, printed on failure."""
    import zlib

    s = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: the tiny models' ops are far too small for threads, and
    on a shared 2-core machine two OpenMP threads make them tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
