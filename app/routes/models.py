"""The model catalog: the timm models this server can build and the weights available for each."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query

from spkd.app import catalog
from spkd.app.deps import (
    Ctx,
    Owner,
)
from spkd.app.openapi import error_responses
from spkd.app.schemas import (
    ModelInfo,
    ModelList,
    WeightFile,
)
from spkd.core import references

log = logging.getLogger("spkd.api")

router = APIRouter()


@router.get(
    "/v1/models",
    response_model=ModelList,
    tags=["models"],
    responses=error_responses(),
    summary="Models the server can build, with the weights available for each",
)
def list_models(
    ctx: Ctx,
    owner: Owner,
    q: Annotated[str | None, Query(max_length=100, description="substring filter")] = None,
    pretrained: Annotated[bool | None, Query(description="only models with hub weights")] = None,
) -> ModelList:
    settings = ctx.settings
    out = []
    for name, tags in catalog.timm_models().items():
        if (q and q.lower() not in name.lower()) or (pretrained and not tags):
            continue
        out.append(
            ModelInfo(
                name=name,
                pretrained_tags=list(tags),
                weights=catalog.weights_available(name, settings.hub_weights),
            )
        )
    files = [
        WeightFile(**f)
        for f in catalog.weight_files(settings.weights_root_list())
        if references.is_public_weight_file(settings, Path(str(f["path"])))
    ]
    return ModelList(total=len(out), data=out, weight_files=files)
