import os
import sys

# Tests run on CPU, deterministically, with 8 virtual devices so sharded meshes can be tested;
# unsharded tests use the first device only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A private t5g2 cache (embedded corpus, trained vocabularies) shared by the data tests."""
    return str(tmp_path_factory.mktemp("t5g2-cache"))


@pytest.fixture(scope="session")
def documents(cache_dir):
    """The embedded corpus as documents."""
    from t5g2.data.sources import open_documents

    return open_documents("embedded", cache_dir=cache_dir)
