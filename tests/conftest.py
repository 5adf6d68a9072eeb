"""Shared fixtures: tiny synthetic datasets, materialized once per session."""

import os
import sys

import pytest

# Select the Keras 2 API before any test module imports TensorFlow or TFRS directly.
import models.tf_compat  # noqa: F401,E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))


def pytest_configure(config):
    del config


def tiny_synthetic_config(**overrides):
    from pipeline.data.synthetic import SyntheticConfig

    values = dict(num_users=300, num_items=200, mean_impressions_per_user=12, latent_dim=8,
                  num_categories=4, subcategories_per_category=2, brands_per_subcategory=2,
                  num_tags=12, history_length=5, users_per_chunk=120, seed=7)
    values.update(overrides)
    return SyntheticConfig(**values)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A materialized tiny synthetic dataset (read-only for tests)."""
    from pipeline.data.materialize import materialize
    from pipeline.data.splits import SplitConfig
    from pipeline.data.synthetic import generate_synthetic

    out = str(tmp_path_factory.mktemp("tiny") / "data")
    materialize(generate_synthetic(tiny_synthetic_config()), out, SplitConfig(method="leave_last_n", n=3))
    return out


def python_subprocess(code: str, timeout: int = 300):
    """Runs `code` in a fresh Python process; returns CompletedProcess (text)."""
    import subprocess

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def recfunnel(*args, timeout: int = 600, env=None):
    """Runs the `recfunnel` CLI in a fresh process (`env`: its environment, default this one's);
    returns CompletedProcess (text)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
