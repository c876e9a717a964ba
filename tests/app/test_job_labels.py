"""Job names and metadata (returned, bounded, filterable), `has_more` on event pages, and one
time format (ISO 8601, UTC) across jobs, events and the progress stream."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from spkd.core import store
from spkd.core.settings import Settings


def spec(**over: object) -> dict:
    body = {
        "teacher": {"model": "test_efficientnet", "weights": "none"},
        "student": {"model": "test_resnet", "weights": "none"},
        "dataset": {"path": "hym"},
        "train": {"epochs": 1, "image_size": 64},
        "baseline": False,
    }
    body.update(over)
    return body


@pytest.fixture(autouse=True)
def data_folder(settings: Settings) -> Path:
    d = Path(settings.data_root) / "hym" / "ants"
    d.mkdir(parents=True)
    return d.parent


def _iso_utc(value: str) -> datetime:
    t = datetime.fromisoformat(value)
    assert t.utcoffset() is not None and t.utcoffset().total_seconds() == 0, value
    return t


def test_name_and_metadata_are_returned_and_filter_the_list(client) -> None:
    made = []
    for i in range(5):
        body = spec(name="nightly" if i % 2 == 0 else "adhoc", metadata={"team": "vision", "run": str(i)})
        res = client.post("/v1/jobs", json=body)
        assert res.status_code == 201, res.text
        assert res.json()["name"] == body["name"] and res.json()["metadata"] == body["metadata"]
        made.append(res.json()["id"])
    nightly = client.get("/v1/jobs", params={"name": "nightly"}).json()
    assert [j["id"] for j in nightly["data"]] == [made[4], made[2], made[0]]
    both = client.get("/v1/jobs", params=[("metadata", "team:vision"), ("metadata", "run:3")]).json()
    assert [j["id"] for j in both["data"]] == [made[3]]
    assert client.get("/v1/jobs", params={"metadata": "team:audio"}).json()["data"] == []
    # Paging through a filter: two pages of one, then the last.
    p1 = client.get("/v1/jobs", params={"name": "nightly", "limit": 2}).json()
    assert [j["id"] for j in p1["data"]] == [made[4], made[2]] and p1["has_more"]
    p2 = client.get("/v1/jobs", params={"name": "nightly", "limit": 2, "after": p1["next_cursor"]}).json()
    assert [j["id"] for j in p2["data"]] == [made[0]] and not p2["has_more"]


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata"),
        ({"metadata": {"bad key": "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"metadata": {"k": 3}}, "metadata"),
    ],
)
def test_name_and_metadata_are_bounded(client, over: dict, field: str) -> None:
    res = client.post("/v1/jobs", json=spec(**over))
    assert res.status_code == 422, res.text
    assert res.json()["error"]["field"].startswith(field)


def test_a_malformed_metadata_filter_is_a_400(client) -> None:
    res = client.get("/v1/jobs", params={"metadata": "no-colon"})
    assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_filter"


def test_event_pages_say_whether_more_follow(client, r, keys) -> None:
    job = client.post("/v1/jobs", json=spec()).json()
    for i in range(4):
        store.add_event(r, keys, job["id"], "info", f"event {i}")
    first = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 3}).json()
    assert len(first["data"]) == 3 and first["has_more"] is True
    rest = client.get(f"/v1/jobs/{job['id']}/events", params={"after": first["next_cursor"]}).json()
    assert len(rest["data"]) == 2 and rest["has_more"] is False  # "job queued" + 4 = 5 events


def test_every_time_is_iso_8601_utc(client, r, keys) -> None:
    job = client.post("/v1/jobs", json=spec()).json()
    created = _iso_utc(job["created_at"])
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert abs((_iso_utc(events[0]["created_at"]) - created).total_seconds()) < 5
    assert "ts" not in events[0]
    # Progress, as the worker writes it (unix seconds), comes out in the same format on the stream.
    progress = {
        "stage": "distill",
        "epoch": 1,
        "epochs": 1,
        "step": 1,
        "steps": 1,
        "updated_at": 1764280000.0,
    }
    store.update_job(r, keys, job["id"], progress=progress)
    store.transition(r, keys, job["id"], store.CANCELLED, [store.QUEUED], "cancelled")
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", params={"stream": "true"}) as s:
        frames = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    bodies = [json.loads(f) for f in frames]
    stamped = [b for b in bodies if "created_at" in b]
    assert stamped and all(_iso_utc(b["created_at"]) for b in stamped)
    prog = [b for b in bodies if b.get("stage") == "distill"]
    assert prog and _iso_utc(prog[0]["updated_at"]).timestamp() == 1764280000.0
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert _iso_utc(got["progress"]["updated_at"]).timestamp() == 1764280000.0
