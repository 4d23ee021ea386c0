"""The ``convert`` deployment's flow: ``convert`` with its parameters as one typed form.

Both this flow and ``flows.convert.convert`` take a :class:`~flows.params.ConvertParams`, so
the Prefect UI shows a form with the quant mixes and engines to choose from and the server
refuses a bad value before a run is created. This one exists because a flow's task runner is
fixed when its run starts: it runs ``convert`` as a subflow (one run per conversion, as from
the CLI) on the runner the form names (a thread pool, or a Dask cluster: ``flows/runners.py``),
and shows the conversion's summary and where its releases are on its own run, the one the UI
lists for the deployment.
"""

from __future__ import annotations

from prefect import flow

from flows.params import ConvertParams, release_name
from flows.runners import convert_with
from tasks import artifacts


@flow(name="convert-model")
def convert_model(params: ConvertParams = ConvertParams()) -> dict:
    """Convert an SO8T checkpoint into validated GGUF files and publish one release per quant mix.

    Args:
        params: The checkpoint, destination, quant mixes and options of the conversion.
    """
    name = release_name(params)  # a name that is no plain name fails here, before the subflow
    state = convert_with(params, flow_run_name=name, return_state=True)
    # This is the run the UI opens after "Submit": the summary (FAILED and why, too) and where
    # the releases are belong here, not only on the subflow's run.
    artifacts.repeat_from(state.state_details.flow_run_id, artifacts.release_keys(name, params.quant_names))
    result = state.result()  # a failed conversion fails this run, with the same error
    return {k: v for k, v in result.items() if k != "analysis"}
