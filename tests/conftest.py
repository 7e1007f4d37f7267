"""Shared test setup: one torch thread, and the opt-in notebook run."""

import pytest
import torch

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--run-notebooks", action="store_true", help="execute the notebooks in notebooks/"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-notebooks"):
        return
    skip = pytest.mark.skip(reason="notebooks run in the notebooks tox env (--run-notebooks)")
    for item in items:
        if "notebook" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def two_expert_wan_dir(tmp_path_factory):
    """A saved two-expert WanPipeline (``tests/experts.py``)."""
    from tests.experts import save_two_expert_wan

    return save_two_expert_wan(tmp_path_factory.mktemp("wan22"))


@pytest.fixture(scope="session")
def two_expert_run(two_expert_wan_dir, tmp_path_factory):
    """Statistics collected from ``two_expert_wan_dir`` (one prompt, 4 steps, CFG)."""
    from qvd_bench import store
    from qvd_bench.collect.collector import collect
    from qvd_bench.config import CollectConfig
    from tests.experts import STEPS

    config = CollectConfig(
        model=str(two_expert_wan_dir),
        prompts=("a cat jumps onto a table",),
        steps=STEPS,
        guidance_scale=5.0,
        frames=2,
        height=8,
        width=8,
        temporal_stride=250,
        reservoir_capacity=4,
        attention=True,
    )
    run_dir = tmp_path_factory.mktemp("wan22-run") / "run"
    collect(config, run_dir, progress=False)
    return store.StatsRun(run_dir)
