"""Tenancy matrix: every reference form a job spec can make x {own, another key's,
missing, escaping by `..`, absolute path, symlink}, through the real API (POST /v1/jobs, in-process)
and through the worker's resolution (core.references, as workers/runner.py calls it at run time,
plus execute_job itself for one refused case of each form). The caller is always Bob (KEY_B);
"other" is Alice's (KEY_A). Real Redis, real files, real uploads.

An admin has made the worst choice on purpose: SPKD_WEIGHTS_ROOTS also names the server's whole
folder (which holds the data root, the uploads and the artifact root), so only the resolver's rule
keeps raw paths out of the private areas."""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from spkd.app.main import create_app
from spkd.common.errors import SpkdError
from spkd.common.spec import JobSpec
from spkd.core import references, store
from spkd.core.settings import Settings
from spkd.workers.runner import execute_job
from tests.helpers import KEY_A, KEY_B, make_settings, tiny_spec

BOB = store.owner_of(KEY_B)
ALICE = store.owner_of(KEY_A)
SECRET_CLASSES = ("alicesecreta", "alicesecretb")


def _zip(classes: tuple[str, ...]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in ("train", "val"):
            for c, cls in enumerate(classes):
                for i in range(4):
                    img = io.BytesIO()
                    Image.new("RGB", (32, 32), (40 * i, 120 * c, 7)).save(img, "PNG")
                    zf.writestr(f"{split}/{cls}/{i}.png", img.getvalue())
    return buf.getvalue()


def _finished_job(
    r, keys, settings: Settings, owner: str, status: str, files: bool = True, layout: str = "hub"
) -> str:
    """A job of `owner` in `status` with teacher/student weight files in its artifact folder: in
    their hub folders (`teacher/model.safetensors`), or `layout="flat"` as jobs exported before
    those were the one format (`teacher.safetensors`), or "both" (hub folders and flat copies)."""
    spec = tiny_spec({"path": "shared"}, baseline=False)
    jid = store.create_job(r, keys, owner, JobSpec.model_validate(spec).model_dump(mode="json"))["id"]
    if status != store.QUEUED:
        path = [store.RUNNING] if status == store.RUNNING else [store.RUNNING, status]
        prev = store.QUEUED
        for s in path:
            store.transition(r, keys, jid, s, [prev])
            prev = s
    if files:
        out = Path(settings.artifact_root) / jid
        out.mkdir(parents=True)
        for role in ("teacher", "student"):
            if layout in ("hub", "both"):
                (out / role).mkdir()
                (out / role / "model.safetensors").write_bytes(b"weights of " + owner.encode())
            if layout in ("flat", "both"):
                (out / f"{role}.safetensors").write_bytes(b"weights of " + owner.encode())
    return jid


@dataclass
class World:
    settings: Settings
    client: TestClient
    r: object
    keys: store.Keys
    ids: dict[str, str]
    outside: Path

    def sub(self, text: str) -> str:
        """`{name}` placeholders -> the world's ids and folders."""
        return text.format(**self.ids)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, redis_url: str):
    tmp = tmp_path_factory.mktemp("tenancy")
    srv = tmp / "srv"
    srv.mkdir()
    outside = tmp / "outside"
    outside.mkdir()
    s = make_settings(srv, redis_url)
    s = s.model_copy(update={"weights_roots": f"{srv / 'weights'},{srv}"})  # the admin's worst case
    r, keys = store.connect(redis_url), store.Keys(s.redis_prefix)
    with TestClient(create_app(s)) as client:
        client.headers["Authorization"] = f"Bearer {KEY_B}"
        alice = {"Authorization": f"Bearer {KEY_A}"}
        zip_headers = {"Content-Type": "application/zip"}
        ds_a = client.post("/v1/datasets", content=_zip(SECRET_CLASSES), headers={**alice, **zip_headers})
        ds_b = client.post("/v1/datasets", content=_zip(("ants", "bees")), headers=zip_headers)
        assert ds_a.status_code == ds_b.status_code == 201, (ds_a.text, ds_b.text)
        data, arts, weights = Path(s.data_root), Path(s.artifact_root), Path(srv / "weights")
        uploads = references.uploads_dir(s)
        (data / "shared" / "train" / "ants").mkdir(parents=True)
        (outside / "train" / "x").mkdir(parents=True)
        (weights / "base.safetensors").write_bytes(b"admin weights")
        (outside / "w.safetensors").write_bytes(b"outside")
        ids = {
            "a_ds": ds_a.json()["id"],
            "b_ds": ds_b.json()["id"],
            "a_job": _finished_job(r, keys, s, ALICE, store.SUCCEEDED, layout="both"),
            "a_running": _finished_job(r, keys, s, ALICE, store.RUNNING, files=False),
            "a_failed": _finished_job(r, keys, s, ALICE, store.FAILED),
            "b_job": _finished_job(r, keys, s, BOB, store.SUCCEEDED),
            "b_running": _finished_job(r, keys, s, BOB, store.RUNNING, files=False),
            "b_failed": _finished_job(r, keys, s, BOB, store.FAILED),
            "b_linked": _finished_job(r, keys, s, BOB, store.SUCCEEDED, files=False),
            "b_flat": _finished_job(r, keys, s, BOB, store.SUCCEEDED, layout="flat"),
            "b_both": _finished_job(r, keys, s, BOB, store.SUCCEEDED, layout="both"),
            "missing_job": "job_01zzzzzzzzzzzzzzzzzz",
            "missing_ds": "ds_01zzzzzzzzzzzzzzzzzz",
            "data": str(data),
            "arts": str(arts),
            "weights": str(weights),
            "uploads": str(uploads),
            "outside": str(outside),
            "srv": str(srv),
        }
        # Symlinks an admin (or a careless mount) left in the readable roots.
        (data / "link_alice").symlink_to(uploads / ids["a_ds"], target_is_directory=True)
        (data / "link_out").symlink_to(outside, target_is_directory=True)
        (data / "link_arts").symlink_to(arts, target_is_directory=True)
        (data / "sneaky" / "train").mkdir(parents=True)
        (data / "sneaky" / "train" / "alicesecreta").symlink_to(
            uploads / ids["a_ds"] / "train" / "alicesecreta"
        )
        (weights / "link_alice.safetensors").symlink_to(arts / ids["a_job"] / "teacher" / "model.safetensors")
        (weights / "link_out.safetensors").symlink_to(outside / "w.safetensors")
        (arts / ids["b_linked"] / "teacher").mkdir(parents=True)
        (arts / ids["b_linked"] / "teacher" / "model.safetensors").symlink_to(
            arts / ids["a_job"] / "teacher" / "model.safetensors"
        )
        # A dataset record of Bob's whose folder is Alice's upload (a symlink in the uploads area).
        fake = "ds_01bobsfakeeeeeeeeeee"
        (uploads / fake).symlink_to(uploads / ids["a_ds"], target_is_directory=True)
        store.save_dataset(r, keys, dict(ds_b.json(), id=fake, owner=BOB))
        ids["b_fake_ds"] = fake
        # A weight-suffixed file inside Alice's upload (reachable by name only through a weight root).
        (uploads / ids["a_ds"] / "planted.safetensors").write_bytes(b"in an upload")
        yield World(s, client, r, keys, ids, outside)
    store.delete_prefix(r, s.redis_prefix)


OK = "ok"
# (form, variant, spec part as {field: value} with {placeholders}, API outcome, worker outcome)
# Outcomes: "ok" or an error code; the worker's "spec" means the value never passes JobSpec.
T, S, P, D = "teacher.weights", "student.weights", "dataset.path", "dataset.id"
NA, WNA = "dataset_path_not_allowed", "weights_not_allowed"
MATRIX = [
    # dataset.path: admin folders only; never the uploads area or the artifact root.
    ("dataset.path", "own admin folder", {P: "shared"}, OK, OK),
    ("dataset.path", "own upload by path", {P: "datasets/{b_ds}"}, NA, None),
    ("dataset.path", "other", {P: "datasets/{a_ds}"}, NA, None),
    ("dataset.path", "other, ./ prefix", {P: "./datasets/{a_ds}/"}, NA, None),
    ("dataset.path", "other, the uploads area", {P: "datasets"}, NA, None),
    ("dataset.path", "other, the data root (holds uploads)", {P: "."}, NA, None),
    ("dataset.path", "other, case trick", {P: "Datasets/{a_ds}"}, "dataset_not_found", None),
    ("dataset.path", "missing upload", {P: "datasets/{missing_ds}"}, NA, None),
    ("dataset.path", "missing, case trick", {P: "Datasets/{missing_ds}"}, "dataset_not_found", None),
    ("dataset.path", "missing admin folder", {P: "nope"}, "dataset_not_found", None),
    ("dataset.path", "escape ..", {P: "../../outside"}, NA, None),
    ("dataset.path", "escape .. into uploads", {P: "shared/../datasets/{a_ds}"}, NA, None),
    ("dataset.path", "escape .. into artifacts", {P: "../artifacts/{a_job}"}, NA, None),
    ("dataset.path", "absolute admin folder", {P: "{data}/shared"}, OK, OK),
    ("dataset.path", "absolute other upload", {P: "{uploads}/{a_ds}"}, NA, None),
    ("dataset.path", "absolute outside", {P: "{outside}"}, NA, None),
    ("dataset.path", "NUL byte", {P: "shared\x00x"}, NA, None),
    ("dataset.path", "symlink to other upload", {P: "link_alice"}, NA, None),
    ("dataset.path", "symlink outside", {P: "link_out"}, NA, None),
    ("dataset.path", "symlink to artifacts", {P: "link_arts/{a_job}"}, NA, None),
    ("dataset.path", "class folder symlinked to other", {P: "sneaky"}, NA, None),
    # dataset.id: the caller's own uploads only.
    ("dataset.id", "own", {D: "{b_ds}"}, OK, OK),
    ("dataset.id", "other", {D: "{a_ds}"}, "dataset_not_found", None),
    ("dataset.id", "missing", {D: "{missing_ds}"}, "dataset_not_found", None),
    ("dataset.id", "escape ..", {D: "ds_../{a_ds}"}, "invalid_request", "spec"),
    ("dataset.id", "absolute", {D: "{uploads}/{a_ds}"}, "invalid_request", "spec"),
    ("dataset.id", "own record, folder symlinked to other", {D: "{b_fake_ds}"}, "dataset_not_found", None),
    # weights, relative path: a file under a weight root, never in uploads or artifacts.
    ("weights relative", "own admin file", {T: "base.safetensors"}, OK, OK),
    ("weights relative", "own by path", {T: "artifacts/{b_job}/teacher/model.safetensors"}, WNA, None),
    ("weights relative", "other artifact", {T: "artifacts/{a_job}/teacher/model.safetensors"}, WNA, None),
    ("weights relative", "other, root-relative", {T: "{a_job}/teacher/model.safetensors"}, WNA, None),
    ("weights relative", "other, in an upload", {T: "data/datasets/{a_ds}/planted.safetensors"}, WNA, None),
    ("weights relative", "missing", {T: "artifacts/{missing_job}/teacher/model.safetensors"}, WNA, None),
    ("weights relative", "escape ..", {T: "../outside/w.safetensors"}, WNA, None),
    ("weights relative", "escape .. to artifacts", {T: "../srv/artifacts/{a_job}/student.pth"}, WNA, None),
    ("weights relative", "symlink to other artifact", {T: "link_alice.safetensors"}, WNA, None),
    ("weights relative", "symlink outside", {T: "link_out.safetensors"}, WNA, None),
    ("weights relative", "NUL byte", {T: "base\x00.safetensors"}, WNA, None),
    # weights, absolute path.
    ("weights absolute", "own admin file", {S: "{weights}/base.safetensors"}, OK, OK),
    ("weights absolute", "own artifact", {S: "{arts}/{b_job}/student/model.safetensors"}, WNA, None),
    ("weights absolute", "other artifact", {S: "{arts}/{a_job}/student/model.safetensors"}, WNA, None),
    ("weights absolute", "missing", {S: "{arts}/{missing_job}/student/model.safetensors"}, WNA, None),
    ("weights absolute", "escape ..", {S: "{weights}/../artifacts/{a_job}/student.safetensors"}, WNA, None),
    ("weights absolute", "outside", {S: "{outside}/w.safetensors"}, WNA, None),
    ("weights absolute", "symlink to other artifact", {S: "{weights}/link_alice.safetensors"}, WNA, None),
    # job:<id>: the caller's own jobs only, whatever the other's status.
    ("job:", "own succeeded", {T: "job:{b_job}"}, OK, OK),
    ("job:", "own running (may finish first)", {T: "job:{b_running}"}, OK, "weights_job_not_finished"),
    ("job:", "own failed", {T: "job:{b_failed}"}, "weights_job_not_finished", None),
    ("job:", "other succeeded", {T: "job:{a_job}"}, "weights_job_not_found", None),
    ("job:", "other running", {T: "job:{a_running}"}, "weights_job_not_found", None),
    ("job:", "other failed", {T: "job:{a_failed}"}, "weights_job_not_found", None),
    ("job:", "missing", {T: "job:{missing_job}"}, "weights_job_not_found", None),
    ("job:", "escape ..", {T: "job:../{a_job}"}, "invalid_request", "spec"),
    ("job:", "absolute", {T: "job:{arts}/{a_job}"}, "invalid_request", "spec"),
    ("job:", "own, file symlinked to other's", {T: "job:{b_linked}"}, "weights_job_not_found", None),
    ("job:", "own, old layout (flat files)", {T: "job:{b_flat}"}, OK, OK),
]  # fmt: skip


def _spec(world: World, part: dict[str, str]) -> dict:
    spec = tiny_spec({"path": "shared"})
    for dotted, value in part.items():
        section, leaf = dotted.split(".")
        value = world.sub(value)
        if section == "dataset":
            spec["dataset"] = {leaf: value}
        else:
            spec[section] = dict(spec[section], **{leaf: value})
    return spec


def _id(case: tuple) -> str:
    return f"{case[0]}: {case[1]}"


@pytest.mark.parametrize("case", MATRIX, ids=[_id(c) for c in MATRIX])
def test_api_matrix(world: World, case: tuple) -> None:
    form, variant, part, expected, _ = case
    resp = world.client.post("/v1/jobs", json=_spec(world, part))
    if expected == OK:
        assert resp.status_code == 201, resp.text
        return
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == expected, err
    field = next(iter(part))
    assert err["field"] == field or (expected == "invalid_request" and err["field"].startswith(field)), err
    # Nothing of Alice's in the answer: no class names, no owner hash, no file of hers resolved.
    for secret in (*SECRET_CLASSES, ALICE, "weights of"):
        assert secret not in resp.text


@pytest.mark.parametrize("case", MATRIX, ids=[_id(c) for c in MATRIX])
def test_worker_matrix(world: World, case: tuple) -> None:
    """What the worker decides at run time (core.references with require_finished=True)."""
    form, variant, part, api_expected, worker_expected = case
    expected = worker_expected or api_expected
    if expected == "spec":
        with pytest.raises(ValueError):
            JobSpec.model_validate(_spec(world, part))
        return
    spec = JobSpec.model_validate(_spec(world, part))
    if expected != OK:
        with pytest.raises(SpkdError) as e:
            references.resolve_spec(world.r, world.keys, world.settings, spec, BOB)
        assert e.value.code == expected and e.value.field == next(iter(part)), e.value
        return
    data_dir, resolved = references.resolve_spec(world.r, world.keys, world.settings, spec, BOB)
    allowed = [Path(world.ids["data"]) / "shared", references.uploads_dir(world.settings) / world.ids["b_ds"]]
    assert data_dir in allowed
    for role in ("teacher", "student"):
        w = getattr(resolved, role).weights
        if w not in ("none", "hub", "package"):
            assert Path(w).read_bytes() in (b"admin weights", b"weights of " + BOB.encode()), w


SAME_AS_MISSING = [
    ("dataset.id", {D: "{a_ds}"}, {D: "{missing_ds}"}, "a_ds", "missing_ds"),
    ("dataset.path", {P: "datasets/{a_ds}"}, {P: "datasets/{missing_ds}"}, "a_ds", "missing_ds"),
    ("weights path", {T: "artifacts/{a_job}/t.pt"}, {T: "artifacts/{missing_job}/t.pt"},
     "a_job", "missing_job"),
    ("job: succeeded", {T: "job:{a_job}"}, {T: "job:{missing_job}"}, "a_job", "missing_job"),
    ("job: running", {T: "job:{a_running}"}, {T: "job:{missing_job}"}, "a_running", "missing_job"),
    ("job: failed", {T: "job:{a_failed}"}, {T: "job:{missing_job}"}, "a_failed", "missing_job"),
]  # fmt: skip


@pytest.mark.parametrize("case", SAME_AS_MISSING, ids=[c[0] for c in SAME_AS_MISSING])
def test_another_keys_answers_exactly_like_missing(world: World, case: tuple) -> None:
    _, other, missing, other_id, missing_id = case
    a = world.client.post("/v1/jobs", json=_spec(world, other))
    b = world.client.post("/v1/jobs", json=_spec(world, missing))
    assert a.status_code == b.status_code == 422
    body_a = a.text.replace(world.ids[other_id], "<id>")
    body_b = b.text.replace(world.ids[missing_id], "<id>")
    assert body_a == body_b, (a.text, b.text)
    assert dict(a.headers).keys() == dict(b.headers).keys()


REFUSED_AT_RUN = [
    ("dataset.path", {"dataset.path": "datasets/{a_ds}"}, "dataset_path_not_allowed"),
    ("dataset.id", {"dataset.id": "{a_ds}"}, "dataset_not_found"),
    ("weights relative", {T: "artifacts/{a_job}/teacher/model.safetensors"}, "weights_not_allowed"),
    ("weights absolute", {S: "{arts}/{a_job}/student/model.safetensors"}, "weights_not_allowed"),
    ("job:", {T: "job:{a_job}"}, "weights_job_not_found"),
]


@pytest.mark.parametrize("case", REFUSED_AT_RUN, ids=[c[0] for c in REFUSED_AT_RUN])
def test_execute_job_refuses_what_the_api_refuses(world: World, case: tuple) -> None:
    """A job record that got past submission (written straight to the store: the files changed
    between POST and run) fails in the worker with the API's code and field, before any training."""
    _, part, code = case
    spec = JobSpec.model_validate(_spec(world, part)).model_dump(mode="json")
    jid = store.create_job(world.r, world.keys, BOB, spec)["id"]
    assert execute_job(world.r, world.keys, world.settings, jid, "tenancy-test") == "failed"
    job = store.get_job(world.r, world.keys, jid)
    assert job["error"]["code"] == code and job["error"]["field"] == next(iter(part)), job["error"]
    log = json.dumps(store.list_events(world.r, world.keys, jid))
    assert not any(s in log for s in SECRET_CLASSES)


def test_models_endpoint_lists_no_private_files(world: World) -> None:
    files = [f["path"] for f in world.client.get("/v1/models?q=zzzz").json()["weight_files"]]
    assert os.path.join(world.ids["weights"], "base.safetensors") in files
    for f in files:
        assert world.ids["a_job"] not in f and world.ids["b_job"] not in f and "planted" not in f, files


@pytest.mark.parametrize(
    ("job", "want"),
    [
        ("b_job", "teacher/model.safetensors"),
        ("b_flat", "teacher.safetensors"),
        ("b_both", "teacher/model.safetensors"),
    ],
)
def test_job_weights_read_the_hub_folder_then_the_old_flat_file(world: World, job: str, want: str) -> None:
    """`job:<id>` takes the job's hub folder (`teacher/model.safetensors`); a job stored in the old
    layout (flat `teacher.safetensors` only) still serves; with both, the hub folder wins."""
    model = tiny_spec({"path": "shared"})["teacher"]["model"]
    r, keys, settings = world.r, world.keys, world.settings
    got = references.resolve_job_weights(r, keys, settings, "teacher", model, world.ids[job], BOB)
    assert got == (Path(world.ids["arts"]) / world.ids[job] / want).resolve()
