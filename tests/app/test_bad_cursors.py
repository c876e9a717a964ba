"""Bad cursors and ids are 4xx with a stable code, in-process app on the real
Redis. Before: an event cursor past Redis's 64-bit stream ids (or with non-ASCII digits) was a
500, and as `Last-Event-ID` it opened the SSE stream and then dropped it."""

from __future__ import annotations

from pathlib import Path

import pytest

from spkd.core.settings import Settings
from tests.helpers import tiny_spec

SSE = {"Accept": "text/event-stream"}
HUGE = "99999999999999999999-0"
U64_MAX = "18446744073709551615-18446744073709551615"

# (method, path with {job}, query, headers, status, code)
BAD = [
    ("GET", "/v1/jobs/{job}/events", {"after": HUGE}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/{job}/events", {"after": "0-99999999999999999999"}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/{job}/events", {"after": U64_MAX}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/{job}/events", {"after": "\u0661\u0662-\u0663"}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/{job}/events", {"after": "-1-0"}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/{job}/events", {"after": "1-2-3"}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/{job}/events", {"after": ""}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/{job}/events", {"after": HUGE, "stream": "true"}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/{job}/events", {}, {**SSE, "Last-Event-ID": HUGE}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/{job}/events", {}, {**SSE, "Last-Event-ID": U64_MAX}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/{job}/events", {}, {**SSE, "Last-Event-ID": "abc"}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs", {"after": "not a cursor"}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs", {"after": "["}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs", {"after": "x" * 500}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/datasets", {"after": "bad cursor"}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/datasets", {"after": "ds_" + "z" * 300}, {}, 400, "invalid_cursor"),
    ("GET", "/v1/jobs/%00", {}, {}, 404, "job_not_found"),
    ("GET", "/v1/jobs/" + "j" * 5000, {}, {}, 404, "job_not_found"),
    ("GET", "/v1/jobs/%FF%FE", {}, {}, 404, "job_not_found"),
    ("POST", "/v1/jobs/job_%0A%0D/cancel", {}, {}, 404, "job_not_found"),
    ("GET", "/v1/jobs/job_x%00/events", {}, {}, 404, "job_not_found"),
    ("GET", "/v1/jobs/{job}/artifacts/%00", {}, {}, 404, "artifact_not_found"),
    ("GET", "/v1/jobs/{job}/artifacts/.hidden", {}, {}, 404, "artifact_not_found"),
    ("GET", "/v1/jobs/{job}/artifacts/" + "a" * 5000, {}, {}, 404, "artifact_not_found"),
    # artifact names may have folders (tensorboard/<stage>/...), so this reaches the route now
    ("GET", "/v1/jobs/{job}/artifacts/..%2F..%2Fsecret", {}, {}, 404, "artifact_not_found"),
    ("GET", "/v1/datasets/ds_%00", {}, {}, 404, "dataset_not_found"),
    ("GET", "/v1/datasets/" + "d" * 5000, {}, {}, 404, "dataset_not_found"),
    ("GET", "/v1/datasets/%FF", {}, {}, 404, "dataset_not_found"),
]


@pytest.fixture
def job_id(client, settings: Settings) -> str:
    (Path(settings.data_root) / "hym").mkdir()
    return client.post("/v1/jobs", json=tiny_spec({"path": "hym"})).json()["id"]


def _label(case: tuple) -> str:
    method, path, query, headers, *_ = case
    return f"{method} {path[:40]} {list(query.items())[:1]} {headers.get('Last-Event-ID', '')}"


@pytest.mark.parametrize("case", BAD, ids=[_label(c) for c in BAD])
def test_bad_cursor_or_id_is_4xx_with_a_code(client, job_id: str, case: tuple) -> None:
    method, path, query, headers, status, code = case
    resp = client.request(method, path.format(job=job_id), params=query, headers=headers)
    assert resp.status_code == status, resp.text[:300]
    assert resp.headers["content-type"].startswith("application/json")  # not a stream cut short
    err = resp.json()["error"]
    assert err["code"] == code and err["message"], err
    if code == "invalid_cursor":
        assert err["field"] in ("after", "Last-Event-ID"), err


def test_largest_valid_cursor_still_works(client, job_id: str) -> None:
    resp = client.get(
        f"/v1/jobs/{job_id}/events", params={"after": "9999999999999999999-9999999999999999999"}
    )
    assert resp.status_code == 200 and resp.json()["data"] == []
    first = client.get(f"/v1/jobs/{job_id}/events").json()["data"][0]["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={**SSE, "Last-Event-ID": first}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        client.post(f"/v1/jobs/{job_id}/cancel")
        body = "".join(s.iter_text())
    assert "event: end" in body
