import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A metric logged without its line in rl/metrics.py's registry fails the test that logs it
# (in this process and in the `python rl/run.py` processes the tests start).
os.environ["RL_STRICT_METRICS"] = "1"

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items):
    """A test module names its tier with `pytestmark = pytest.mark.integration` (or e2e);
    the rest is the unit tier, which `make test-fast` runs."""
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="module")
def local_ray(request):
    """A local Ray instance for the module's tests, with the module's RAY_CPUS CPUs (2 unless
    it says), shut down after them."""
    import ray

    ray.init(num_cpus=getattr(request.module, "RAY_CPUS", 2), include_dashboard=False)
    yield
    ray.shutdown()
