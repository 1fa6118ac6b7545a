"""Shared test settings (deterministic, quiet, CPU, offline) and fixtures: the toy model and world, the quick
synthetic world.

tests/ mirrors the package (tests/negatives/ tests cir_plugins/negatives/, ...); the helper modules shared by
several folders (_toy.py, _gloo.py, _example_helpers.py) sit here. Every test folder is put on sys.path, and on
the PYTHONPATH of the subprocesses tests start, so a test and its children import those helpers by name.
"""

import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
_FOLDERS = [str(TESTS)] + sorted(str(p) for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
sys.path[:0] = [f for f in _FOLDERS if f not in sys.path]
os.environ["PYTHONPATH"] = os.pathsep.join(_FOLDERS + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                       if p and p not in _FOLDERS])

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


@pytest.fixture()
def toy_model():
    """``toy_model(**kwargs)``: a fresh toy CIR model (tests/_toy.py: linear image tower, EmbeddingBag text, sum
    fusion; ``tokens_per_image=T`` for multi-vector targets, ``dim``, ``seed``)."""
    from _toy import make_model

    return make_model


@pytest.fixture()
def toy_world():
    """``toy_world(**kwargs) -> (images, train, val)``: the toy world of tests/_toy.py (61 random (3, 4, 4) images,
    triplets whose target is the reference shifted by its word)."""
    from _toy import make_world

    return make_world


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory):
    """A small synthetic world on disk (about 300 images, CIRR layout; seconds to render), shared by the session."""
    from cir_plugins.data.synthetic import make_world

    small = dict(n_train_triplets=24, n_train_unlabelled=40, n_val_queries=4, n_val_distractors=4,
                 n_test_queries=12, n_test_distractors=20)
    return make_world(tmp_path_factory.mktemp("world") / "world", seed=0, size=small, workers=1)
