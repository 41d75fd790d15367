"""Shared fixtures. Eight emulated CPU devices, so the real 8-way pmap runs in every test session."""
import collections
import contextlib
import functools
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny fixture of scripts/make_tiny_data.py: data/, data_config.json, model/."""
    from make_tiny_data import build_fixture
    out = tmp_path_factory.mktemp("tiny")
    build_fixture(str(out), lines_per_file=2000, seed=0)
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over 30 s; `pytest -m 'not slow'` leaves it out")


@contextlib.contextmanager
def pmap_traces():
    """How often each function given to jax.pmap is traced while the block runs, by name: a
    pmapped function's Python body runs only when jax traces it, i.e. once per compilation."""
    import jax
    traces, pmap = collections.Counter(), jax.pmap

    def counting_pmap(fun, *args, **kwargs):
        @functools.wraps(fun)
        def traced(*inputs):
            traces[fun.__name__] += 1
            return fun(*inputs)
        return pmap(traced, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax, "pmap", counting_pmap)
        yield traces
