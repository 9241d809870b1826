"""A local Ray cluster for the tests that render on one (loopback only, two CPUs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh two-CPU local Ray cluster joined by this process, shut down after the module:
    ``.ray`` is the module, ``.address`` its GCS address, with which child processes join it
    (``--ray ADDRESS``)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield SimpleNamespace(ray=ray, address=ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
