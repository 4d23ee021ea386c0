"""The Prefect artifacts a flow run left."""

import asyncio

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId


def run_artifacts(flow_run_id) -> dict[str, list]:
    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    by_type: dict[str, list] = {}
    for a in asyncio.run(read()):
        by_type.setdefault(a.type, []).append(a)
    return by_type
