"""Test setup: 8 fake CPU devices and no persistent compilation cache.

This runs before any test module imports JAX, so the flags take effect. The persistent
compilation cache is off for the test processes and every ``cadenza`` subprocess they
start (the environment is inherited): on XLA:CPU, loading a cached executable written by
another process once aborted a test worker inside XLA's deserializer (jax 0.12), and a
suite must not depend on what earlier runs left in ``~/.cache``.
"""

import os
import pathlib

# The tests' programs are tiny: compiling them dominates, so XLA:CPU's LLVM back end runs
# its cheap optimisation level (about 40% less CPU per test file; the HLO passes, and so
# what the tests check, are unchanged).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0"
                           + " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# AOT compiles for TPU load libtpu, which otherwise takes a machine-wide lockfile that a
# concurrent or killed test process leaves held; no TPU is used here.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
os.environ["CADENZA_COMPILE_CACHE"] = "off"

import jax  # noqa: E402
import pytest  # noqa: E402


# Tiny variants of every family in the family table, each switching on that family's
# special features (see cadenza.models.families), plus Llama with llama3 rope scaling.
def _family_overrides():
    from cadenza.models.families import NAMES, family_overrides

    table = {name: family_overrides(name) for name in NAMES}
    table["llama3_rope"] = table["llama"] + [
        "model.rope_scaling.type=llama3", "model.rope_scaling.factor=8.0",
        "model.rope_scaling.original_max_position_embeddings=64", "model.rope_theta=500000.0"]
    return table


FAMILY_OVERRIDES = _family_overrides()


def tiny_model_config(family: str = "llama", *overrides: str):
    """The tiny preset switched to ``family``'s features, plus extra overrides."""
    from cadenza.config import load_config

    return load_config(None, FAMILY_OVERRIDES[family] + list(overrides), preset="tiny").model


def single_device_train_step(config):
    """``(state, step, mesh)``: a fresh full-model train state and its jitted step for
    ``config`` on one device (microbatches and z-loss from ``config.train``)."""
    from cadenza.train.mesh import batch_sharding, make_mesh, replicated
    from cadenza.train.optim import make_optimizer, make_schedule
    from cadenza.train.state import init_state, state_shardings
    from cadenza.train.step import make_train_step
    from cadenza.train.task import full_model_task

    mesh = make_mesh(config.mesh, jax.devices()[:1])
    rules = config.mesh.rules()
    task, opt = full_model_task(config.model), make_optimizer(config.train)
    shardings = state_shardings(task, opt, mesh, rules)
    state = init_state(task, opt, 0, mesh, rules, shardings)
    step = make_train_step(task, opt, make_schedule(config.train),
                           microbatches=config.train.microbatches, z_loss=config.train.z_loss,
                           rules=rules, state_shardings=shardings, frozen_shardings={},
                           batch_sharding=batch_sharding(mesh, rules),
                           metric_sharding=replicated(mesh))
    return state, step, mesh


# The longest test files (over a minute of CPU each on the 2-core CI machine), longest
# first. They are collected first, and ``make test`` (``--dist loadfile
# --no-loadscope-reorder``) hands whole files to its two workers in collection order, so
# these start early instead of last: xdist's default order (most tests first) left the
# one-test quickstart file running alone at the end of the run.
LONG_FILES = ("test_quickstart.py", "test_model.py", "test_quantization.py",
              "test_kernels_attention.py", "test_decode_families.py",
              "test_pods_multiprocess.py")


def pytest_collection_modifyitems(items):
    """Move the tests of :data:`LONG_FILES` to the front (stable: the other files and the
    order within each file stay as collected)."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


@pytest.fixture(scope="session")
def one_device_step():
    return single_device_train_step


@pytest.fixture
def tiny_config():
    return tiny_model_config


@pytest.fixture(scope="session")
def chi2():
    """The chi-square helpers of tests/test_spec_sampling.py (``toy``, ``enumerate_warped``,
    ``chi_square``, ``PROMPT``, ``CFG``) in a private copy that enumerates the first two
    generated tokens (64 cells). Test modules are not importable by name under
    --import-mode=importlib, hence the copy."""
    import importlib.util

    path = pathlib.Path(__file__).with_name("test_spec_sampling.py")
    spec = importlib.util.spec_from_file_location("_spec_sampling_helpers_n2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.N = 2
    return module


SMALL_LM = ["model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_heads=2", "model.num_kv_heads=2"]


@pytest.fixture(scope="session")
def small_lm():
    """``(config, Transformer, params)``: a one-layer model of the tiny preset whose scaled
    LM head makes greedy choices far from ties (decoding-equality tests)."""
    from cadenza.config import load_config
    from cadenza.models import Transformer, init_params

    cfg = load_config(None, SMALL_LM, preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 30.0}}
    return cfg, Transformer(cfg.model), params


@pytest.fixture(autouse=True)
def _restore_cadenza_logger():
    """Tests that run ``setup_logging`` (distributed init, the CLI) install a handler on
    that test's captured stderr and stop propagation; restore the logger afterwards so
    later tests (in any order, e.g. under pytest-xdist) log normally."""
    import logging

    log = logging.getLogger("cadenza")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


# What libtpu prints when it initialises on a machine without TPUs.
LIBTPU_NOISE = ("libtpu", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "E0000",
                "Logging before InitGoogle")


@pytest.fixture
def libtpu_noise():
    """``noise(stderr)``: the libtpu start-up markers found in ``stderr`` (none expected)."""
    return lambda text: [n for n in LIBTPU_NOISE if n in text]


@pytest.fixture
def cli_env():
    """``env(**extra)``: the environment of a CLI subprocess as a user's shell has it: no
    JAX_PLATFORMS and no fake CPU devices (this process sets both), so the CLI's own
    platform choice runs."""
    def env(**extra):
        out = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
        flags = out.pop("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
        if flags.strip():
            out["XLA_FLAGS"] = flags.strip()
        return {**out, **extra}

    return env
# ----- preference pairs (tests of the preference data format and tasks) -----

PREF_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def pair_records(n=24):
    """``n`` preference records: the answer repeats the word (chosen) or gives the next
    one (rejected); every third uses ``messages`` with an earlier assistant turn."""
    out = []
    for i in range(n):
        w, other = PREF_WORDS[i % 10], PREF_WORDS[(i + 1) % 10]
        if i % 3:
            out.append({"prompt": f"say {w}", "chosen": w, "rejected": f"{other} {other}"})
        else:
            out.append({"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"},
                                     {"role": "user", "content": f"say {w}"}],
                        "chosen": [{"role": "assistant", "content": w}],
                        "rejected": other})
    return out


@pytest.fixture(scope="session")
def pref_files(tmp_path_factory):
    """Preference pairs (``pairs.jsonl``: :func:`pair_records` and three bad records) and
    a small tokenizer (``tok``)."""
    import json

    from cadenza.models.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("pref")
    lines = [json.dumps(r) for r in pair_records()]
    lines += ['{"prompt": "x", "chosen": "same", "rejected": "same"}', '{"prompt": "x"}',
              "{not json"]
    (d / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    train_tokenizer([" ".join(PREF_WORDS) + " say hi hello"] * 20, 300, d / "tok")
    return d


@pytest.fixture(scope="session")
def pref_config(pref_files):
    """``(*overrides) -> ExperimentConfig``: a tiny experiment reading ``pref_files`` as
    preference data (rows of 64 positions, batches of 2)."""
    from cadenza.config import load_config

    def make(*overrides):
        return load_config(None, [
            f"data.data_dir={pref_files / 'prepared'}", f"data.tokenizer={pref_files / 'tok'}",
            "data.format=preference", f"data.path={pref_files / 'pairs.jsonl'}",
            "data.heldout_fraction=0.2", "train.seq_len=64", "train.batch_size=2",
            *overrides], preset="tiny")
    return make


@pytest.fixture
def fake_gcs():
    """``gs://`` served from memory: an fsspec file system registered as ``gcs`` (what
    etils.epath uses for gs:// without TensorFlow), removed afterwards."""
    import fsspec
    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""
        store, pseudo_dirs = {}, [""]

        def __init__(self, *args, finalize_on_close=False, **kwargs):
            super().__init__(*args, **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            return str(path).split("://", 1)[-1].rstrip("/")

    from fsspec.registry import known_implementations

    known = known_implementations["gcs"]["class"]
    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield FakeGCS()
    fsspec.register_implementation("gcs", known, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
