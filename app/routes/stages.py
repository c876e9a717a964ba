"""The stages a job goes through (common.spec.STAGE_INFO, the one list of them), for clients and
the dashboard: names in run order, titles, and which spec fields plan them."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from spkd.app.deps import Owner
from spkd.app.openapi import error_responses
from spkd.app.schemas import StageList, StageOut
from spkd.common.spec import STAGE_INFO

router = APIRouter()


@router.get(
    "/v1/stages",
    response_model=StageList,
    tags=["jobs"],
    responses=error_responses(),
    summary="The stages of a job, in the order they run",
)
def list_stages(owner: Owner) -> StageList:
    """Every stage a job can have; a job runs those its spec plans (`planned_by`), in this order."""
    return StageList(data=[StageOut(**asdict(info), trains=info.trains) for info in STAGE_INFO])
