"""Try a finished job's model: classify 1-16 uploaded images with its shipped student (app/predict.py:
onnxruntime inside the API process, the engine's decoder and evaluation transform, no torch)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from spkd.app.deps import Ctx, Owner, own_job
from spkd.app.errors import ApiError
from spkd.app.middleware import BodyTooLarge
from spkd.app.openapi import error_responses
from spkd.app.schemas import Prediction
from spkd.core import store

router = APIRouter(prefix="/v1/jobs", tags=["predict"])

TOP_K_MAX = 100


def _predictor(request: Request) -> Any:
    """The process's Predictor, made at the first predict request (onnxruntime and NumPy are only
    imported then: the API starts as fast as before)."""
    from spkd.app.predict import Predictor

    st = request.app.state
    if getattr(st, "predictor", None) is None:
        st.predictor = Predictor(st.settings)
    return st.predictor


def _check_job(ctx: Ctx, owner: str, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The caller's finished job and its registered ONNX file, or the 404 / 409 that says why not."""
    job = own_job(ctx, owner, job_id)
    if job["status"] != store.SUCCEEDED:
        err = ApiError(
            409,
            "job_not_finished",
            f"job {job_id} is {job['status']}: only a succeeded job has a model to predict with",
        )
        err.extra["status"] = job["status"]  # `status` is also ApiError's HTTP status argument
        raise err
    onnx = store.get_artifact(ctx.redis, ctx.keys, job_id, "student.onnx")
    config = store.get_artifact(ctx.redis, ctx.keys, job_id, "student/config.json")
    if onnx is None or config is None:
        raise ApiError(
            409,
            "no_onnx_model",
            f"job {job_id} has no student.onnx with its student/config.json among its artifacts "
            "(a job from before they were exported): rerun it to predict through the API",
        )
    return job, onnx


@router.post(
    "/{job_id}/predict",
    response_model=Prediction,
    responses=error_responses(400, 404, 409, 413, 422),
    summary="Classify images with the job's shipped student",
    description="`multipart/form-data` with 1 to SPKD_PREDICT_MAX_IMAGES image files (parts named "
    "`images`; every file part counts), each at most SPKD_PREDICT_MAX_IMAGE_BYTES. The job's "
    "`student.onnx` runs in the API process under onnxruntime on the CPU; images are decoded and "
    "preprocessed exactly as evaluation did in training (resize, centre crop, normalisation from the "
    "student's hub config). Answers the `top_k` classes of each image with their softmax "
    "probabilities, in the order sent. 409 `job_not_finished` before the job succeeded, 409 "
    "`no_onnx_model` without an ONNX model, 429 `too_many_predictions` (with Retry-After) when the "
    "process is busy with SPKD_PREDICT_CONCURRENCY requests.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {"type": "array", "items": {"type": "string", "format": "binary"}}
                        },
                        "required": ["images"],
                    }
                }
            },
        }
    },
)
async def predict(
    request: Request,
    ctx: Ctx,
    owner: Owner,
    job_id: str,
    top_k: Annotated[int, Query(ge=1, le=TOP_K_MAX, description="classes returned per image")] = 5,
) -> Prediction:
    from spkd.app import predict as pred

    settings = ctx.settings
    job, onnx_meta = await anyio.to_thread.run_sync(_check_job, ctx, owner, job_id)
    predictor = _predictor(request)
    if not predictor.slots.take():
        raise ApiError(
            429,
            "too_many_predictions",
            f"this API process is already running {predictor.slots.limit} predict requests "
            "(SPKD_PREDICT_CONCURRENCY); retry in a second",
            headers={"Retry-After": "1"},
        )
    try:
        uploads = await _receive(request, settings.predict_max_images)
        try:
            images = await anyio.to_thread.run_sync(pred.decode_uploads, uploads, settings)
        finally:
            for up in uploads:
                up.file.close()
        model = await anyio.to_thread.run_sync(
            predictor.cache.get, pred.model_key(job, onnx_meta), lambda: pred.load_model(settings, job)
        )
        scores = await anyio.to_thread.run_sync(pred.classify, model, images, top_k)
    finally:
        predictor.slots.give_back()
    labels = model.labels
    metrics = job.get("metrics") if isinstance(job.get("metrics"), dict) else {}
    return Prediction(
        job_id=job_id,
        model={
            "architecture": model.architecture,
            "trained": metrics.get("shipped"),
            "file": pred.ONNX,
            "image_size": model.cfg.image_size,
        },
        predictions=[
            {
                "file": up.name,
                "top": [
                    {"label": labels[i] if i < len(labels) else str(i), "index": i, "probability": p}
                    for i, p in top
                ],
            }
            for up, top in zip(uploads, scores, strict=True)
        ],
    )


async def _receive(request: Request, max_images: int) -> list[Any]:
    """The file parts of the multipart body, in order, as app.predict.Upload; ApiError 400
    `invalid_multipart` for a body that is not one, 422 `too_many_images` / `no_images`."""
    from spkd.app.predict import Upload

    try:
        form = await request.form(max_files=max_images, max_fields=16, max_part_size=64 * 1024)
    except BodyTooLarge:
        raise  # the middleware has answered 413 already
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise ApiError(
                422,
                "too_many_images",
                f"at most {max_images} images per request (SPKD_PREDICT_MAX_IMAGES)",
                "images",
            ) from None
        raise ApiError(
            400, "invalid_multipart", f"the multipart body could not be read: {exc.detail}"
        ) from None
    uploads = [
        Upload(name=v.filename or "", file=v.file, size=v.size or 0)
        for _, v in form.multi_items()
        if isinstance(v, UploadFile)
    ]
    if not uploads:
        raise ApiError(
            422,
            "no_images",
            f"send 1 to {max_images} image files as multipart/form-data parts named `images` "
            '(curl -F "images=@photo.jpg")',
            "images",
        )
    return uploads
