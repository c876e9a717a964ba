"""Free text a user stores and others see refuses control characters (NUL, ESC, CR, LF, TAB, C1),
line/paragraph separators and bidirectional controls, with a 422 naming the field: a job's name,
metadata values and MLflow experiment, a dataset's name (query or multipart field), an
Idempotency-Key, a webhook URL, and every query parameter. And no error message repeats a huge
value whole. Through the real app in-process, the real Redis and the real data root."""

from __future__ import annotations

from pathlib import Path

import pytest

from spkd.core.settings import Settings
from tests.helpers import tiny_spec

BAD = {
    "NUL": "\x00",
    "ESC": "\x1b[31m",
    "CR": "\r",
    "LF": "\n",
    "TAB": "\t",
    "DEL": "\x7f",
    "C1 NEL": "\x85",
    "RLO U+202E": "\u202e",
    "LRE U+202A": "\u202a",
    "RLI U+2067": "\u2067",
    "PDI U+2069": "\u2069",
    "RLM U+200F": "\u200f",
    "ALM U+061C": "\u061c",
    "LINE SEPARATOR": "\u2028",
}
FINE = ["résumé 日本語 😀", "a-b_c.d (v2) #3", "👩\u200d💻 emoji with a joiner", "שלום"]


@pytest.fixture
def hym(settings: Settings) -> dict:
    (Path(settings.data_root) / "hym").mkdir(parents=True, exist_ok=True)
    return {"path": "hym"}


def _refused(resp, field: str, code: str = "invalid_request") -> None:
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["field"] == field, err
    assert "U+" in err["message"], err


@pytest.mark.parametrize("char", BAD.values(), ids=BAD.keys())
def test_job_text_fields_refuse_control_and_bidi_characters(client, hym: dict, char: str) -> None:
    text = f"report{char}gpj.exe"
    _refused(client.post("/v1/jobs", json=tiny_spec(hym, name=text)), "name")
    _refused(client.post("/v1/jobs", json=tiny_spec(hym, metadata={"team": text})), "metadata")
    mlflow = [{"type": "mlflow", "experiment": text}]
    _refused(client.post("/v1/jobs", json=tiny_spec(hym, integrations=mlflow)), "integrations.0.experiment")
    assert client.get("/v1/jobs").json()["data"] == []


def test_job_text_fields_keep_every_printable_script(client, hym: dict) -> None:
    for text in FINE:
        resp = client.post("/v1/jobs", json=tiny_spec(hym, name=text, metadata={"note": text}))
        assert resp.status_code == 201, resp.text
        assert resp.json()["name"] == text and resp.json()["metadata"] == {"note": text}


@pytest.mark.parametrize("char", ["\x1b", "\u202e", "\x00", "\n"], ids=["ESC", "RLO", "NUL", "LF"])
def test_dataset_names_refuse_them_and_store_nothing(client, settings: Settings, char: str) -> None:
    from tests.app.test_hostile_uploads import jpeg, make_zip

    data = make_zip({"a/1.jpg": jpeg(), "b/2.jpg": jpeg()})
    raw = client.post(
        "/v1/datasets",
        params={"name": f"cats{char}"},
        content=data,
        headers={"Content-Type": "application/zip"},
    )
    _refused(raw, "name")
    multipart = client.post("/v1/datasets", files={"file": ("d.zip", data)}, data={"name": f"cats{char}"})
    _refused(multipart, "name")
    assert client.get("/v1/datasets").json()["data"] == []
    assert list((Path(settings.data_root) / "datasets").iterdir()) == []
    ok = client.post("/v1/datasets", files={"file": ("d.zip", data)}, data={"name": "chats 猫"})
    assert ok.status_code == 201 and ok.json()["name"] == "chats 猫", ok.text


def test_idempotency_keys_and_query_parameters_refuse_them(client, hym: dict) -> None:
    spec = tiny_spec(hym)
    for raw in (b"key\x1b[2J", "key\u202e".encode(), b"key\x85"):
        _refused(client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": raw}), "idempotency-key")
    _refused(client.get("/v1/jobs", params={"name": "x\x1b"}), "name")
    _refused(client.get("/v1/jobs", params={"metadata": "team:\u202ex"}), "metadata")
    _refused(client.get("/v1/models", params={"q": "res\x00"}), "q")
    assert client.get("/v1/jobs").json()["data"] == []
    assert (
        client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "retry-7 é".encode()}).status_code
        == 201
    )


def test_webhook_urls_refuse_them(client) -> None:
    for url in (
        "http://93.184.215.14/\u202ekoob",
        "http://93.184.215.14/a\x1bb",
        "http://93.184.215.14/\u2066x",
    ):
        resp = client.post("/v1/webhooks", json={"url": url})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_webhook_url", resp.text
        assert "U+" in resp.json()["error"]["message"]
    assert client.get("/v1/webhooks").json()["data"] == []


# ---------------------------------------------------------------- echoes of what was sent


def test_error_messages_never_echo_a_huge_value_whole(client, hym: dict) -> None:
    big = "K" * 500_000
    answers = {
        "model name": client.post("/v1/jobs", json=tiny_spec(hym) | {"teacher": {"model": big}}),
        "weights": client.post(
            "/v1/jobs", json=tiny_spec(hym) | {"student": {"model": "resnet18", "weights": big}}
        ),
        "unknown field": client.post("/v1/jobs", json=tiny_spec(hym) | {big: 1}),
        "metadata key": client.post("/v1/jobs", json=tiny_spec(hym, metadata={big: "x"})),
        "method name": client.post("/v1/jobs", json=tiny_spec(hym) | {"distill": {"methods": {big: None}}}),
        "job id": client.get("/v1/jobs/job_" + "K" * 5000),
        "cursor": client.get("/v1/jobs", params={"after": "K" * 5000}),
        "webhook host": client.post("/v1/webhooks", json={"url": "http://" + "k" * 1970 + ".invalid/"}),
    }
    sizes = {what: len(resp.content) for what, resp in answers.items()}
    print(sizes)
    for what, resp in answers.items():
        assert 400 <= resp.status_code < 500, (what, resp.status_code)
        err = resp.json()["error"]
        assert len(resp.content) < 3000, (what, len(resp.content))
        assert "KKKKK" in resp.text or "kkkkk" in resp.text, (what, err)  # still says which value
        assert "\u2026" in err["message"] or "\u2026" in (err["field"] or "") or "..." in err["message"], err
