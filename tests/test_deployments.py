"""prefect.yaml points at real flows with parameters those flows accept."""

import inspect
import os

import yaml
from prefect.flows import load_flow_from_entrypoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_deployment_entrypoint_loads_and_its_parameters_exist():
    spec = yaml.safe_load(open(os.path.join(ROOT, "prefect.yaml")))
    assert spec["deployments"]
    for dep in spec["deployments"]:
        path, _, func = dep["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(os.path.join(ROOT, path) + ":" + func)
        accepted = inspect.signature(flow.fn).parameters
        assert set(dep.get("parameters", {})) <= set(accepted), dep["name"]
        assert dep["work_pool"]["name"]
