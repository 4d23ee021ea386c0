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


def test_each_deployment_s_parameters_are_a_valid_run():
    """What prefect.yaml gives each deployment is what its flow accepts: the convert form's
    defaults are valid ConvertParams, and the catalog it names loads (relative to the project
    root, where the worker runs)."""
    from flows.catalog import load_catalog
    from flows.params import ConvertParams

    for dep in yaml.safe_load(open(os.path.join(ROOT, "prefect.yaml")))["deployments"]:
        parameters = dep.get("parameters", {})
        if "params" in parameters:
            assert ConvertParams(**parameters["params"]).quants, dep["name"]
        if "catalog" in parameters:
            assert load_catalog(os.path.join(ROOT, parameters["catalog"])), dep["name"]
