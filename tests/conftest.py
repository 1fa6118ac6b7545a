"""Shared test settings: deterministic, quiet, CPU, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a whole test module (the dev box's 2 cores are shared: avoids oversubscription
    stalls); use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """One FAISS OpenMP thread for a whole test module (same reason as one_torch_thread); use with
    ``pytestmark = pytest.mark.usefixtures("one_faiss_thread")`` in a module that has imported faiss."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def _run_within(seconds, fn):
    """fn() in a daemon thread: (finished, its result or the exception it raised); a call that blocks forever
    (a FIFO read, a frozen event loop) shows as not finished instead of hanging the test run."""
    import threading

    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001 (handed back to the test)
            box["value"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), box.get("value")


@pytest.fixture()
def within():
    """``within(seconds, fn) -> (finished, result or exception)``: for tests that a call does not block."""
    return _run_within
