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


def test_the_convert_form_and_the_catalog_schedule():
    from flows.catalog import load_catalog
    from flows.params import ConvertParams

    deployments = {d["name"]: d for d in yaml.safe_load(open(os.path.join(ROOT, "prefect.yaml")))["deployments"]}
    convert = deployments["convert"]
    assert convert["entrypoint"] == "flows/convert_model.py:convert_model"
    assert ConvertParams(**convert["parameters"]["params"]).quants  # the defaults are a valid form
    catalog = deployments["requantize-catalog"]
    assert catalog["entrypoint"] == "flows/catalog.py:requantize_catalog"
    assert [s["cron"] for s in catalog["schedules"]] == ["0 3 * * *"]
    # The default catalog (relative to the project root, where the worker runs) is valid.
    models = load_catalog(os.path.join(ROOT, catalog["parameters"]["catalog"]))
    assert models[0].source == os.path.join(ROOT, "checkpoints", "smollm2-135m-so8t-demo")
    assert models[0].destination == os.path.join(ROOT, "artifacts")
