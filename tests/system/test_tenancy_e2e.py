"""End to end through real processes: Bob tries every raw path into Alice's
upload, and swaps an admin folder for a symlink to it after a valid POST; then a real worker runs
whatever was accepted. Nothing Bob can read (jobs, events, metrics, artifacts) ever shows Alice's
class names, and his one legitimate job trains on his own data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from spkd.core import references, store
from tests.core.test_references import SECRET_CLASSES, _zip
from tests.helpers import KEY_A, KEY_B, Stack, dump, events, small_imagefolder, tiny_spec, wait_final

pytestmark = pytest.mark.slow


def _everything_bob_sees(c, job_ids: list[str]) -> str:
    seen = [c.get("/v1/jobs", params={"limit": 100}).text, c.get("/v1/datasets").text]
    for jid in job_ids:
        seen += [c.get(f"/v1/jobs/{jid}").text, c.get(f"/v1/jobs/{jid}/events").text]
        for art in c.get(f"/v1/jobs/{jid}/artifacts").json()["data"]:
            if art["name"].endswith((".json", ".html")):
                seen.append(c.get(f"/v1/jobs/{jid}/artifacts/{art['name']}").text)
    return "\n".join(seen)


def test_bobs_jobs_never_see_alices_classes(stack_factory, redis_url: str) -> None:
    st: Stack = stack_factory(redis_url)
    data = Path(st.settings.data_root)
    small_imagefolder(data / "shared", per_class=4)  # ants / bees, an admin folder
    small_imagefolder(data / "swap", per_class=4)
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    st.start_api()
    st.wait_api()
    with st.client(KEY_A) as alice, st.client(KEY_B) as bob:
        up = alice.post(
            "/v1/datasets", content=_zip(SECRET_CLASSES), headers={"Content-Type": "application/zip"}
        )
        assert up.status_code == 201, up.text
        a_ds = up.json()["id"]
        uploads = references.uploads_dir(st.settings)
        accepted: list[str] = []
        for path in (f"datasets/{a_ds}", "datasets", ".", f"./datasets/{a_ds}/", str(uploads / a_ds)):
            resp = bob.post("/v1/jobs", json=tiny_spec({"path": path}))
            if resp.status_code == 201:
                accepted.append(resp.json()["id"])
            else:
                assert resp.status_code == 422, resp.text
                assert resp.json()["error"]["code"] == "dataset_path_not_allowed", resp.text
        # Valid at POST, then the admin folder becomes a symlink to Alice's upload.
        swapped = bob.post("/v1/jobs", json=tiny_spec({"path": "swap"}))
        assert swapped.status_code == 201, swapped.text
        shutil.rmtree(data / "swap")
        (data / "swap").symlink_to(uploads / a_ds, target_is_directory=True)
        mine = bob.post("/v1/jobs", json=tiny_spec({"path": "shared"})).json()["id"]

        st.start_worker("w1")
        st.wait_ready()
        jobs = [*accepted, swapped.json()["id"], mine]
        final = {jid: wait_final(r, keys, jid, 300) for jid in jobs}
        seen = _everything_bob_sees(bob, jobs)
        for secret in SECRET_CLASSES:
            assert secret not in seen, f"Bob sees Alice's class {secret!r}"
        assert accepted == [], "raw paths into the uploads area were accepted"
        swap_job = final[swapped.json()["id"]]
        assert swap_job["status"] == "failed", dump(events(r, keys, swap_job["id"]))
        assert swap_job["error"]["code"] == "dataset_path_not_allowed", swap_job["error"]
        assert final[mine]["status"] == "succeeded", (dump(events(r, keys, mine)), st.logs())
        assert final[mine]["metrics"]["dataset"]["classes"] == ["ants", "bees"], final[mine]["metrics"]
