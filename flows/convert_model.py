"""The ``convert`` deployment's flow: ``convert`` with its parameters as one typed form.

Both this flow and ``flows.convert.convert`` take a :class:`~flows.params.ConvertParams`, so
the Prefect UI shows a form with the quant mixes and engines to choose from and the server
refuses a bad value before a run is created. This one exists because a flow's task runner is
fixed when its run starts: it runs ``convert`` as a subflow (one run per conversion, as from
the CLI) on the runner the form names (a thread pool, or a Dask cluster: ``flows/runners.py``).
"""

from __future__ import annotations

from prefect import flow

from flows.params import ConvertParams, release_name
from flows.runners import convert_with


@flow(name="convert-model")
def convert_model(params: ConvertParams = ConvertParams()) -> dict:
    """Convert an SO8T checkpoint into validated GGUF files and publish one release per quant mix.

    Args:
        params: The checkpoint, destination, quant mixes and options of the conversion.
    """
    result = convert_with(params, flow_run_name=release_name(params))  # a name that is no plain name fails here
    return {k: v for k, v in result.items() if k != "analysis"}
