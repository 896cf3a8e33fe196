import os

# Tests run on CPU, deterministically, with 8 virtual devices so sharded meshes can be tested;
# unsharded tests use the first device only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()


import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# The many short `launch.train` subprocesses of one test session compile the same small programs:
# they share JAX's persistent compilation cache in this directory (tests/test_multihost.py `_env`
# passes it on). Made by the session's first process; xdist workers inherit the variable.
COMPILATION_CACHE_VAR = "T5G2_TEST_COMPILATION_CACHE"


def pytest_configure(config):
    if COMPILATION_CACHE_VAR not in os.environ:
        os.environ[COMPILATION_CACHE_VAR] = tempfile.mkdtemp(prefix="t5g2-jax-cache-")
        config._t5g2_made_compilation_cache = True


def pytest_unconfigure(config):
    if getattr(config, "_t5g2_made_compilation_cache", False):
        shutil.rmtree(os.environ.pop(COMPILATION_CACHE_VAR), ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A private t5g2 cache (embedded corpus, trained vocabularies) shared by the data tests."""
    return str(tmp_path_factory.mktemp("t5g2-cache"))


@pytest.fixture(scope="session")
def documents(cache_dir):
    """The embedded corpus as documents."""
    from t5g2.data.sources import open_documents

    return open_documents("embedded", cache_dir=cache_dir)


UL2_RUN_LENGTH = 32  # encoder and decoder length of `ul2_run`


@pytest.fixture(scope="session")
def ul2_run(tmp_path_factory, cache_dir):
    """The workdir of a 1-step UL2 run (2 layers, lengths 32, the embedded corpus): a checkpoint
    with a tokenizer, for the tools that read one (lm_eval, generation)."""
    from t5g2.train import loop
    from tests.test_checkpoint import _small_config

    config = _small_config(1)
    config.data.source = "ul2"
    config.data.ul2.cache_dir = cache_dir
    config.train.encoder_length = config.train.decoder_length = UL2_RUN_LENGTH
    workdir = str(tmp_path_factory.mktemp("ul2_run") / "run")
    loop.train(config, workdir)
    return workdir


@pytest.fixture(scope="session")
def ul2_export(ul2_run, tmp_path_factory):
    """`ul2_run` exported as a Hugging Face directory (config.json, safetensors,
    tokenizer.model, t5g2_vocabulary.json)."""
    from t5g2.train.export import export

    out = str(tmp_path_factory.mktemp("ul2_export") / "hf")
    export(ul2_run, out)
    return out
