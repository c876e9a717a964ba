"""The dashboard in a real headless Chromium against a real API, Redis and `spkd worker`.

One scenario, in the order a person would use it: sign in, upload a zip and create a job from the
form, watch it move and draw its curves, read its result (the shipped student, its accuracy, size
and speed), download the student as a zip and the report, try the model on a photo, download an
artifact, pause a second job, resume it and cancel it; then the same page on a phone-sized screen
and with the keyboard alone. Any console error fails the test (but the one 422 the test provokes).
Screenshots go to the test's tmp_path.
"""

from __future__ import annotations

import json
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.helpers import HYMENOPTERA

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]


def _dataset_zip(dst: Path, per_class: int = 8) -> Path:
    """A small real slice of hymenoptera (train/ and val/) plus its real GIF placeholder, zipped."""
    with zipfile.ZipFile(dst, "w") as zf:
        for split in ("train", "val"):
            for cls_dir in sorted((HYMENOPTERA / split).iterdir()):
                for img in sorted(cls_dir.glob("*.jpg"))[:per_class]:
                    zf.write(img, f"{split}/{cls_dir.name}/{img.name}")
        zf.write(HYMENOPTERA / "train/ants/imageNotFound.gif", "train/ants/imageNotFound.gif")
    return dst


class Console:
    """Collects console errors and uncaught page exceptions; the test fails if any appear."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page: Any) -> Any:
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        return page


def _launch(pw: Any) -> Any:
    return pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def _sign_in(page: Any, base: str, key: str) -> None:
    page.goto(base + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("#view-jobs:not([hidden])")


def _fill_job(page: Any, epochs: int, teacher_ft: int) -> None:
    page.locator("#f-teacher").fill("test_resnet")
    page.locator("#f-teacher-weights").fill("none")
    page.locator("#f-teacher-ft").fill(str(teacher_ft))
    page.locator("#f-student").fill("test_efficientnet")
    page.locator("#f-student-weights").fill("none")
    page.get_by_label("Epochs", exact=True).fill(str(epochs))
    page.get_by_label("SP weight").fill("100")
    page.get_by_label("Batch size").fill("8")
    page.get_by_label("Learning rate").fill("0.01")
    page.get_by_label("Image size").fill("64")
    page.get_by_label("Loader processes").fill("0")  # load in-process: 2 shared cores


def _create_job(page: Any) -> str:
    page.get_by_role("button", name="Create job").click()
    page.wait_for_url(re.compile(r"#/jobs/[^/]+$"), timeout=15_000)
    return page.url.rsplit("/", 1)[1]


def test_dashboard_end_to_end(live_stack: dict[str, Any], tmp_path: Path) -> None:
    try:
        _scenario(live_stack, tmp_path)
    except Exception:
        print(live_stack["logs"]())  # the API and worker logs, shown by pytest on failure
        raise


def _scenario(live_stack: dict[str, Any], tmp_path: Path) -> None:
    base, key = live_stack["url"], live_stack["api_key"]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    archive = _dataset_zip(tmp_path / "hymenoptera_slice.zip")
    console = Console()

    with playwright.sync_playwright() as pw:
        browser = _launch(pw)
        ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = console.watch(ctx.new_page())
        page.set_default_timeout(20_000)

        # Sign in; the key stays in sessionStorage, never in the URL.
        _sign_in(page, base, key)
        assert key not in page.url
        page.screenshot(path=shots / "01-jobs-empty.png", full_page=True)

        # Upload the zip, then create a job from the form.
        page.get_by_role("link", name="New job").first.click()
        page.wait_for_selector("#view-new:not([hidden])")
        page.get_by_label("Dataset zip").set_input_files(archive)
        page.get_by_role("button", name="Upload").click()
        _until(page, "document.querySelector('#upload-status').textContent.startsWith('Uploaded')", 30)
        assert "ants, bees" in page.locator("#upload-status").inner_text()
        dataset_id = page.locator("#f-dataset").input_value()
        assert dataset_id.startswith("ds_")
        _fill_job(page, epochs=3, teacher_ft=1)
        page.screenshot(path=shots / "02-new-job-form.png", full_page=True)
        job_id = _create_job(page)

        # Progress moves, curves appear per stage as epochs end, the job succeeds.
        seen = _watch_until_final(page, shots / "03-job-running.png", 180)
        assert seen["status"] == "succeeded", seen
        fractions = [f for f in seen["fractions"] if 0 < f < 1]
        assert len(set(fractions)) >= 3 and fractions == sorted(fractions), seen["fractions"]
        assert len(set(seen["epochs"])) >= 3, seen["epochs"]  # e.g. "1 / 1", "1 / 3", "2 / 3"...
        assert seen["curve_counts"] and seen["curve_counts"][0] < 6, seen  # drawn live, before the end
        _check_shared_axes(page)
        for who in ("teacher", "baseline", "distilled"):
            assert re.fullmatch(r"\d+\.\d%", page.locator(f"#acc-{who}").inner_text()), who
        _check_result(page, base, key, job_id, tmp_path, console)
        _check_old_format(page, live_stack, job_id, console)
        assert page.locator("#p-stream").inner_text() in ("live", "ended")
        assert page.locator("#events li").count() >= 5
        assert page.locator("#job-cancel").is_hidden()

        # Every artifact is offered, grouped, folders collapsed; downloading one gives the server's bytes.
        page.wait_for_selector("#artifacts button[data-artifact='student.onnx']")
        names = page.locator("#artifacts button").evaluate_all("bs => bs.map(b => b.dataset.artifact)")
        assert {"student/model.safetensors", "student.onnx", "metrics.json"} <= set(names)
        assert not [n for n in names if "/" not in n and n.endswith(".safetensors")], names  # each model once
        groups = page.locator("#artifacts .art-group h3").evaluate_all("hs => hs.map(h => h.textContent)")
        assert groups == ["Models", "Reports", "Logs (TensorBoard)"], groups
        folders = page.locator("#artifacts details")
        assert folders.count() >= 2 and not any(folders.evaluate_all("ds => ds.map(d => d.open)"))
        assert page.locator("#artifacts button[data-artifact^='tensorboard/']").first.is_hidden()
        with page.expect_download() as dl:
            page.locator("#artifacts button[data-artifact='metrics.json']").click()
        saved = tmp_path / "metrics.json"
        dl.value.save_as(saved)
        # After success the job folder holds only its current attempt's folder (core/attempts.py).
        [served] = (live_stack["artifact_root"] / job_id).glob("attempt-*/metrics.json")
        assert saved.read_bytes() == served.read_bytes()
        page.screenshot(path=shots / "04-job-succeeded.png", full_page=True)

        # A second, long job: pause it once it runs, resume it, then cancel it.
        page.goto(base + "/#/new")
        page.wait_for_selector("#f-dataset option[value^='ds_']", state="attached")
        page.locator("#f-dataset").select_option(index=1)
        _fill_job(page, epochs=200, teacher_ft=0)
        long_id = _create_job(page)
        page.wait_for_selector("#job-status.running", timeout=60_000)
        assert page.locator("#job-resume").is_hidden()
        page.get_by_role("button", name="Pause job").click()
        page.wait_for_selector("#job-status.paused", timeout=60_000)
        assert page.locator("#job-pause").is_hidden() and page.locator("#job-cancel").is_visible()
        assert page.locator("#p-eta").inner_text() == "–"  # nothing runs: no end to estimate
        api_job = httpx.get(f"{base}/v1/jobs/{long_id}", headers={"Authorization": f"Bearer {key}"}).json()
        assert api_job["status"] == "paused", api_job
        page.screenshot(path=shots / "05-job-paused.png", full_page=True)
        page.get_by_role("button", name="Resume job").click()
        page.wait_for_selector("#job-status.running", timeout=60_000)  # a new attempt runs it
        assert page.locator("#job-resume").is_hidden() and page.locator("#job-pause").is_visible()
        assert page.locator("#job-error-msg").inner_text() == ""
        page.get_by_role("button", name="Cancel job").click()
        page.wait_for_selector("#job-status.cancelled", timeout=60_000)
        assert page.locator("#job-pause").is_hidden() and page.locator("#job-resume").is_hidden()
        page.screenshot(path=shots / "05-job-cancelled.png", full_page=True)

        # A job the worker rejects (a layer the teacher does not have; only the worker can tell):
        # its page shows the error's code, message and field. Created by another client, over REST.
        bad_spec = {
            "teacher": {"model": "test_resnet", "weights": "none"},
            "student": {"model": "test_efficientnet", "weights": "none"},
            "dataset": {"id": dataset_id},
            "distill": {"layers": [{"teacher": "no_such_layer", "student": "no_such_layer"}]},
            "train": {"epochs": 1, "batch_size": 8, "image_size": 64, "num_workers": 0},
        }
        auth = {"Authorization": f"Bearer {key}"}
        bad_id = httpx.post(f"{base}/v1/jobs", json=bad_spec, headers=auth, timeout=30).json()["id"]
        page.goto(f"{base}/#/jobs/{bad_id}")
        page.wait_for_selector("#job-status.failed", timeout=60_000)
        page.wait_for_selector("#job-failure:not([hidden])")
        assert page.locator("#fail-field").inner_text().startswith("distill.layers")
        assert "no_such_layer" in page.locator("#fail-message").inner_text()
        assert page.locator("#fail-code").inner_text() not in ("", "–")
        page.screenshot(path=shots / "06-job-failed.png", full_page=True)

        # The jobs table shows them all, newest first, with their statuses.
        page.get_by_role("link", name="Jobs", exact=True).click()
        page.wait_for_selector(f"#jobs-table tr[data-job='{bad_id}']")
        rows = page.locator("#jobs-table tbody tr")
        assert [rows.nth(i).get_attribute("data-job") for i in range(3)] == [bad_id, long_id, job_id]
        statuses = [rows.nth(i).locator(".badge").inner_text() for i in range(3)]
        assert statuses == ["failed", "cancelled", "succeeded"]
        page.screenshot(path=shots / "07-jobs-table.png", full_page=True)
        page.get_by_label("Status").select_option("cancelled")
        page.wait_for_selector(f"#jobs-table tr[data-job='{job_id}']", state="detached")
        shown = page.locator("#jobs-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.job)")
        assert shown == [long_id]
        ctx.close()

        # Phone-sized screen: nothing wider than the screen, the table reads as cards.
        phone = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
        page = console.watch(phone.new_page())
        _sign_in(page, base, key)
        page.wait_for_selector(f"#jobs-table tr[data-job='{job_id}']")
        _fits(page, 375)
        assert page.locator("#jobs-table thead").evaluate("e => e.getBoundingClientRect().height") <= 1
        page.screenshot(path=shots / "08-phone-jobs.png", full_page=True)
        page.goto(f"{base}/#/jobs/{job_id}")
        page.wait_for_selector("#curves polyline[data-stage='distill']")
        _fits(page, 375)
        page.screenshot(path=shots / "09-phone-job.png", full_page=True)
        phone.close()

        # A wrong key: a clear message, still on the sign-in form (the 401 is the only console error).
        bad = browser.new_context()
        wrong = Console()
        page = wrong.watch(bad.new_page())
        page.goto(base + "/")
        page.get_by_label("API key").fill("not-a-key")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_selector("#signin-error:has-text('not accepted')")
        assert page.locator("#view-signin").is_visible() and page.locator("#nav").is_hidden()
        # A typo in a model name: the API's 422 is shown, with its close matches, and focus goes
        # to the field to fix.
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_selector("#view-jobs:not([hidden])")
        page.goto(base + "/#/new")
        page.wait_for_selector("#f-dataset option[value^='ds_']", state="attached")
        page.locator("#f-dataset").select_option(index=1)
        _fill_job(page, epochs=1, teacher_ft=0)
        page.locator("#f-teacher").fill("test_resnnet")
        page.get_by_role("button", name="Create job").click()
        page.wait_for_selector("#job-form-error:has-text('teacher.model')")
        assert "test_resnet" in page.locator("#job-form-error").inner_text()  # the close match
        assert page.evaluate("document.activeElement.id") == "f-teacher"
        assert page.locator("#f-teacher").get_attribute("aria-invalid") == "true"
        assert "#/new" in page.url
        page.screenshot(path=shots / "11-form-error.png", full_page=True)
        assert all(" 401 " in e or " 422 " in e for e in wrong.errors), wrong.errors
        bad.close()

        # Keyboard alone: sign in, reach a job through Tab, open it, focus lands on its heading.
        kb = browser.new_context(viewport={"width": 1280, "height": 900})
        page = console.watch(kb.new_page())
        page.goto(base + "/")
        page.keyboard.press("Tab")  # skip link
        assert page.evaluate("document.activeElement.className") == "skip"
        _tab_to(page, "document.activeElement.id === 'apikey'")
        page.keyboard.type(key)
        page.keyboard.press("Enter")
        page.wait_for_selector("#view-jobs:not([hidden])")
        assert page.evaluate("document.activeElement.id") == "jobs-h"
        page.wait_for_selector(f"#jobs-table a[href='#/jobs/{job_id}']")
        _tab_to(page, f"document.activeElement.getAttribute('href') === '#/jobs/{job_id}'")
        time.sleep(3.5)  # one auto-refresh of the table: focus must stay on the same job's link
        assert page.evaluate("document.activeElement.getAttribute('href')") == f"#/jobs/{job_id}"
        focus_ring = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert focus_ring != "none", "the focused link must be visible"
        page.keyboard.press("Enter")
        page.wait_for_selector("#view-job:not([hidden])")
        assert page.evaluate("document.activeElement.id") == "job-h"
        _tab_to(page, "document.activeElement.dataset.artifact === 'metrics.json'")
        with page.expect_download() as dl:
            page.keyboard.press("Enter")
        assert dl.value.suggested_filename == "metrics.json"
        page.screenshot(path=shots / "10-keyboard-focus.png")
        kb.close()
        browser.close()

    assert not console.errors, console.errors


def _check_result(page: Any, base: str, key: str, job_id: str, tmp_path: Path, console: Console) -> None:
    """The finished job's page leads with its result, as the API's metrics say it; the shipped
    student downloads as a zip, the report as a file; the drop zone answers what predict answers."""
    auth = {"Authorization": f"Bearer {key}"}
    metrics = httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth, timeout=30).json()["metrics"]
    page.wait_for_selector("#result:not([hidden])")
    shipped = metrics["shipped"]
    assert f"the {shipped} student" in page.locator("#res-shipped").inner_text()
    assert page.locator("#res-acc").inner_text() == f"{100 * metrics[shipped]['report_acc']:.1f}%"
    verdict = page.locator("#res-verdict").inner_text()
    assert "95 % CI" in verdict and metrics["comparison"]["verdict"] in verdict, verdict
    assert page.locator("#p-stage").inner_text() == "finished"
    summary = (metrics.get("deploy") or {}).get("student_vs_teacher")  # the form leaves measure on
    if summary:
        assert summary["headline"].lower() in page.locator("#res-headline").inner_text().lower()
        assert page.locator("#res-deploy-table tbody tr").count() >= 2
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download the shipped student (zip)").click()
    saved = tmp_path / "student.zip"
    dl.value.save_as(saved)
    assert "student/model.safetensors" in zipfile.ZipFile(saved).namelist()
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download the report (report.html)").click()
    saved = tmp_path / "report.html"
    dl.value.save_as(saved)
    assert "<html" in saved.read_text()[:300].lower()

    # Try it: a real bee photo through the file input shows what predict answers for it directly.
    page.wait_for_selector("#try:not([hidden])")
    bee = sorted((HYMENOPTERA / "val/bees").glob("*.jpg"))[0]
    direct = httpx.post(
        f"{base}/v1/jobs/{job_id}/predict?top_k=3",
        headers=auth,
        files=[("images", (bee.name, bee.read_bytes(), "image/jpeg"))],
        timeout=60,
    ).json()
    page.get_by_label("Images to classify").set_input_files(bee)
    item = page.locator(f"#try-results > li[data-file='{bee.name}']")
    item.wait_for()
    assert item.locator(".topk .label").first.inner_text() == direct["predictions"][0]["top"][0]["label"]
    top = direct["predictions"][0]["top"]
    assert item.locator(".topk > li").count() == len(top)
    assert f"{100 * top[0]['probability']:.1f}%" in item.locator(".topk > li").first.inner_text()
    page.screenshot(path=tmp_path / "screenshots" / "04-job-result.png", full_page=True)
    # The same photo dropped on the zone (a DataTransfer, as a drag from the desktop brings).
    dropped = page.evaluate_handle(
        """([name, bytes]) => { const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], name, { type: 'image/jpeg' })); return dt; }""",
        ["dropped.jpg", list(bee.read_bytes())],
    )
    page.locator("#drop").dispatch_event("drop", {"dataTransfer": dropped})
    item = page.locator("#try-results > li[data-file='dropped.jpg']")
    item.wait_for()
    assert item.locator(".topk .label").first.inner_text() == top[0]["label"]
    # Not an image: the API's 422 is shown plainly (and is the only console error it causes).
    before = len(console.errors)
    page.get_by_label("Images to classify").set_input_files(
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}]
    )
    page.wait_for_selector("#try-error:has-text('not_an_image')")
    page.locator("#try").screenshot(path=tmp_path / "screenshots" / "04-job-try-error.png")
    assert all(" 422 " in e for e in console.errors[before:]), console.errors[before:]
    del console.errors[before:]


STAGES = (
    ("teacher_finetune", "Teacher fine-tune"),
    ("baseline", "Baseline student"),
    ("distill", "Distillation"),
)


def _check_shared_axes(page: Any) -> None:
    """Every stage on the same axes, the split named: one accuracy chart (the selection split of
    teacher, baseline and distilled student), one CE chart (each stage's CE, training and
    selection split), and the distillation terms apart (only the distill stage has them, never CE)."""
    charts = page.locator("#curves svg[data-metric]")
    assert charts.evaluate_all("ss => ss.map(s => s.dataset.metric)") == ["acc", "ce", "terms"]
    captions = page.locator("#curves figcaption").evaluate_all("cs => cs.map(c => c.textContent)")
    assert captions == [
        "Accuracy on the selection split",
        "Cross-entropy of each stage",
        "Distillation terms (training, weighted)",
    ], captions

    def lines(metric: str, kind: str = "") -> list[list[str | None]]:
        sel = f"#curves svg[data-metric='{metric}'] polyline{'.' + kind if kind else ''}"
        return page.locator(sel).evaluate_all("ps => ps.map(p => [p.dataset.stage, p.dataset.term || null])")

    stages = [s for s, _ in STAGES]
    assert [s for s, _ in lines("acc", "val")] == stages  # one accuracy chart, every stage on it
    assert lines("acc", "train") == []
    assert [s for s, _ in lines("ce", "val")] == stages and [s for s, _ in lines("ce", "train")] == stages
    terms = lines("terms")
    assert {s for s, _ in terms} == {"distill"} and "sp" in {t for _, t in terms}, terms
    assert "ce" not in {t for _, t in terms}
    acc = page.locator("#curves svg[data-metric='acc']")
    label = acc.get_attribute("aria-label")
    assert "selection split" in label and "same axes" in label and "epoch" in label, label
    legend = acc.locator("xpath=..").locator(".legend li").evaluate_all("ls => ls.map(l => l.textContent)")
    assert legend == [f"{title}, selection split" for _, title in STAGES], legend
    ce = page.locator("#curves svg[data-metric='ce']").locator("xpath=..").locator(".legend li")
    ce_legend = ce.evaluate_all("ls => ls.map(l => l.textContent)")
    assert ce_legend == [
        f"{title}, {part}" for _, title in STAGES for part in ("selection split", "training")
    ]
    # the distinct colours of the stages, the same in every chart
    colours = page.locator("#curves svg[data-metric='acc'] polyline").evaluate_all(
        "ps => ps.map(p => p.getAttribute('stroke'))"
    )
    assert len(set(colours)) == 3, colours


def _check_old_format(page: Any, live_stack: dict[str, Any], job_id: str, console: Console) -> None:
    """A job stored before every number named its split (`val_acc` in the model blocks and the
    curves) still shows its accuracies and curves: its metrics are rewritten so in Redis, the job
    opened in a second tab, and it must read exactly as on `page`."""
    shown = {w: page.locator(f"#acc-{w}").inner_text() for w in ("teacher", "baseline", "distilled")}
    shown["res"] = page.locator("#res-acc").inner_text()
    settings = live_stack["settings"]
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    key = f"{settings.redis_prefix}:job:{job_id}"
    new = r.hget(key, "metrics")
    metrics = json.loads(new)
    for block in (metrics[w] for w in ("teacher", "baseline", "distilled", "soup") if metrics.get(w)):
        block["val_acc"], block["val_loss"] = block.pop("report_acc"), block.pop("report_loss", None)
    for rows in metrics["curves"].values():
        for row in rows:
            row["val_acc"], row["val_loss"] = row.pop("selection_acc"), row.pop("selection_loss")
            del row["eval_split"]
    r.hset(key, "metrics", json.dumps(metrics))
    old = console.watch(page.context.new_page())
    try:
        _sign_in(old, live_stack["url"], live_stack["api_key"])
        old.goto(f"{live_stack['url']}/#/jobs/{job_id}")
        old.wait_for_selector("#curves polyline[data-stage='distill']")
        _until(old, "document.querySelector('#res-acc').textContent !== '–'", 20)
        again = {w: old.locator(f"#acc-{w}").inner_text() for w in ("teacher", "baseline", "distilled")}
        again["res"] = old.locator("#res-acc").inner_text()
        assert again == shown, (again, shown)
        assert old.locator("#curves svg[data-metric='acc'] polyline.val").count() == 3
        assert old.locator("#curves svg[data-metric='ce'] polyline.val").count() == 3
    finally:
        r.hset(key, "metrics", new)
        old.close()


def _watch_until_final(page: Any, shot: Path, timeout_s: float) -> dict[str, Any]:
    """Sample what the job page shows while the job runs: overall progress, epoch, curve count.
    Takes one screenshot mid-run, once a curve is drawn."""
    probe = """() => ({
        status: document.querySelector('#job-status').textContent,
        fraction: document.querySelector('#job-progress').value,
        epoch: document.querySelector('#p-epoch').textContent,
        curves: document.querySelectorAll('#curves polyline.val').length})"""
    seen: dict[str, Any] = {"fractions": [], "epochs": [], "curve_counts": [], "status": None}
    deadline, shot_taken = time.monotonic() + timeout_s, False
    while time.monotonic() < deadline:
        now = page.evaluate(probe)
        seen["status"] = now["status"]
        if now["status"] == "failed":
            raise AssertionError(f"job failed: {page.locator('#job-failure').inner_text()}")
        if now["status"] in ("succeeded", "cancelled"):
            return seen
        samples = {"fractions": now["fraction"], "epochs": now["epoch"], "curve_counts": now["curves"]}
        for key, value in samples.items():
            if value and value != "–" and (not seen[key] or seen[key][-1] != value):
                seen[key].append(value)
        if now["curves"] and not shot_taken:
            page.screenshot(path=shot, full_page=True)
            shot_taken = True
        time.sleep(0.1)
    raise AssertionError(f"job not finished after {timeout_s} s: {seen}")


def _fits(page: Any, width: int) -> None:
    """Nothing sticks out sideways on a phone; name the culprits if something does."""
    if page.evaluate("document.documentElement.scrollWidth") <= width:
        return
    wide = page.evaluate(
        """w => [...document.querySelectorAll('body *')]
        .filter(e => e.getBoundingClientRect().right > w + 0.5 && e.offsetParent !== null)
        .slice(0, 8).map(e => `${e.tagName}#${e.id}.${e.className} ${e.getBoundingClientRect().right}`)""",
        width,
    )
    raise AssertionError(f"wider than {width}px: {wide}")


def _until(page: Any, condition: str, timeout_s: float) -> None:
    """Poll a JS condition. (wait_for_function evals a string in the page, which our CSP forbids.)
    A job the page shows as failed ends the wait at once, with the error the page shows."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(condition):
        if page.locator("#job-status.failed").count():
            raise AssertionError(f"job failed: {page.locator('#job-failure').inner_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s: {condition}")
        time.sleep(0.25)


def _tab_to(page: Any, condition: str, limit: int = 60) -> None:
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate(condition):
            return
    raise AssertionError(f"never reached with Tab: {condition}")
