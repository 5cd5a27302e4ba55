"""The web page in a real browser: Playwright for Python driving Debian's Chromium.

The app runs for real: uvicorn on a free port, the embedded default (SQLite and files under a
temp `CXR_DATA_DIR`, in-process job runner), a small encoder trained here on synthetic images
(a bright disc vs dark stripes; never patient data), its train folder enrolled as references.

Chromium comes from the system (`apt-get install chromium`; `.ci/run` installs it) and is given
to Playwright as `executable_path`: nothing is downloaded. Without it (or without Playwright)
these tests skip with the reason, and fail under `CXR_REQUIRE_SERVICES=1`.

`CXR_UI_SCREENSHOTS=DIR` writes a screenshot of each page there (docs/ui/ holds the committed
ones); `CXR_WEB_BENCH_OUT=FILE` writes the page-weight and drop-to-overlay measurements as JSON.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from tests.app.conftest import TEST_SECRET, dicom_bytes, new_key
from tests.app.conftest_predict import synthetic_xray
from tests.conftest import _missing

pytestmark = pytest.mark.slow

XSS_LABEL = '<img src=x onerror="window.__xss=1">'
#: The small recipe: trains in seconds on two cores, and separates the two synthetic classes.
TINY_TRAINING = {
    "encoder": "resnet9_half",
    "loss": "hybrid",
    "epochs": 3,
    "image_size": 32,
    "batch_size": 8,
    "embedding_dim": 32,
    "n_way_episodes": 20,
    "device": "cpu",
    "workers": 0,
    "progress_bar": False,
}


def find_chromium() -> str | None:
    """The system Chromium: `CXR_CHROMIUM`, else `chromium` / `chromium-browser` on PATH."""
    configured = os.environ.get("CXR_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        _missing("Playwright", f"{exc}; run `uv sync`")
    path = find_chromium()
    if path is None:
        _missing("Chromium", "no `chromium` on PATH; install it with `apt-get install chromium`")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_synthetic_folder(root: Path, *, per_class: int, seed0: int) -> Path:
    """`root/CLASS/*.png` with the two synthetic classes."""
    for kind in ("disc", "stripes"):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / kind / f"{kind}-{i:02d}.png").write_bytes(
                synthetic_xray(kind, seed=seed0 + i, size=(96, 96))
            )
    return root


@dataclass
class LiveService:
    url: str
    settings: Settings
    keys: dict[str, str]
    model_version: str
    queries: Path


@pytest.fixture(scope="module")
def live(chromium_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """A trained model, its references, one key per role, and the app served by uvicorn."""
    import uvicorn

    from app.db.migrate import prepare_database
    from app.quickstart import load_train_split
    from app.services.models import register_model
    from app.services.references import import_references
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("web")
    data = write_synthetic_folder(root / "train", per_class=10, seed0=0)
    queries = write_synthetic_folder(root / "queries", per_class=3, seed0=500)
    config = TrainConfig(data=[str(data)], out=str(root / "run"), **TINY_TRAINING)  # type: ignore[arg-type]
    result = train(config, samples=load_train_split([data], config))

    settings = Settings(data_dir=root / "var", secret_key=TEST_SECRET, device="cpu", log_json=False)
    factory = prepare_database(settings)
    with factory() as session:
        version = register_model(
            session=session, checkpoint=result.checkpoint, settings=settings, activate=True
        ).version
        report = import_references(session=session, source=data, settings=settings)
        assert report.enrolled == 20
    factory.kw["bind"].dispose()

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        keys = {role: new_key(app, role) for role in ("reader", "clinician", "admin")}
        yield LiveService(
            url=f"http://127.0.0.1:{port}",
            settings=settings,
            keys=keys,
            model_version=version,
            queries=queries,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=chromium_path, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser: Any, live: LiveService) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(30_000)
    tab = context.new_page()
    tab.console_messages: list[str] = []  # type: ignore[misc]
    tab.on("console", lambda msg: tab.console_messages.append(msg.text))
    try:
        yield tab
    finally:
        context.close()


def screenshots_dir(tmp_path: Path) -> Path:
    configured = os.environ.get("CXR_UI_SCREENSHOTS")
    path = Path(configured) if configured else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sign_in(page: Any, live: LiveService, role: str) -> None:
    page.goto(live.url + "/")
    page.fill("#api-key", live.keys[role])
    page.click("#login-button")
    page.wait_for_selector("#app:not([hidden])")
    # the key is kept for this tab only, and never put in the URL
    assert page.evaluate("sessionStorage.getItem('cxr.apiKey')") == live.keys[role]
    assert page.evaluate("localStorage.length") == 0
    assert live.keys[role] not in page.url


DROP_AND_WAIT_FOR_OVERLAY = """
async ({b64, name, type}) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const file = new File([bytes], name, {type});
  const transfer = new DataTransfer();
  transfer.items.add(file);
  const overlay = document.getElementById("overlay-img");
  const shown = new Promise((resolve) => overlay.addEventListener("load", resolve, {once: true}));
  const started = performance.now();
  document.getElementById("drop").dispatchEvent(
    new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
  await shown;
  return performance.now() - started;
}
"""


def wait_until(page: Any, expression: str, timeout_s: float = 30.0) -> None:
    """Poll a JS expression from Python (Playwright's own `wait_for_function` polls with
    `eval`, which the page's CSP rightly refuses)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.1)


def drop_image(page: Any, path: Path, mime: str = "image/png") -> float:
    """Drop a file on the Diagnose page like a user would; ms until the overlay is shown."""
    b64 = base64.b64encode(path.read_bytes()).decode()
    return float(
        page.evaluate(DROP_AND_WAIT_FOR_OVERLAY, {"b64": b64, "name": path.name, "type": mime})
    )


def test_clinician_workflow_in_a_real_browser(page: Any, live: LiveService, tmp_path: Path) -> None:
    shots = screenshots_dir(tmp_path)
    admin = {"X-API-Key": live.keys["admin"]}
    sign_in(page, live, "admin")
    assert "decision support, not a diagnosis" in page.inner_text("#notice").lower()

    # -- Diagnose: drop an image, see the answer, the overlay and the neighbours ------------
    query = live.queries / "disc" / "disc-00.png"
    drop_image(page, query)
    assert page.inner_text("#answer-label") == "disc"
    assert page.is_visible("#overlay-img") and page.is_visible("#upload-img")
    overlay_src = page.get_attribute("#overlay-img", "src") or ""
    assert overlay_src.startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('overlay-img').naturalWidth") == 96
    assert page.inner_text("#answer-model") == live.model_version
    bars = page.locator("#distances .bar-row")
    assert bars.count() == 2
    assert page.get_attribute("#distances .bar-row.chosen", "data-label") == "disc"
    neighbours = page.locator("#neighbors li")
    assert neighbours.count() == 5
    assert page.locator("#neighbors .thumb-label").first.inner_text() == "disc"
    wait_until(
        page,
        "[...document.querySelectorAll('#neighbors img')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
    )
    page.fill("#opacity", "30")
    page.dispatch_event("#opacity", "input")
    assert page.evaluate("document.getElementById('overlay-img').style.opacity") == "0.3"
    assert page.is_hidden("#unknown-banner")
    page.screenshot(path=str(shots / "diagnose.png"), full_page=True)

    # A DICOM: the browser cannot show it, the service's overlay can; the unknown banner
    # follows the API's flag for the same file.
    dicom = tmp_path / "scan.dcm"
    dicom.write_bytes(dicom_bytes(5, (64, 48)))
    drop_image(page, dicom, "application/dicom")
    assert page.is_hidden("#upload-img") and page.is_visible("#overlay-img")
    assert page.evaluate("document.getElementById('overlay-img').naturalWidth") == 64
    flagged = httpx.post(
        live.url + "/predict?explain=false",
        headers=admin,
        files={"file": ("scan.dcm", dicom.read_bytes(), "application/dicom")},
    ).json()["unknown"]
    assert page.is_visible("#unknown-banner") == flagged

    # An unreadable upload: the API's words, shown as they are.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image at all")
    page.set_input_files("#diagnose-file", str(bad))
    page.wait_for_selector("#diagnose-error:not([hidden])")
    error = page.inner_text("#diagnose-error")
    direct = httpx.post(
        live.url + "/predict",
        headers={"X-API-Key": live.keys["reader"]},
        files={"file": ("notes.png", bad.read_bytes())},
    )
    assert error == f"{direct.status_code}: {direct.json()['detail']}"
    assert direct.status_code == 415

    # -- References: enroll two files (one new, one already enrolled) ----------------------
    page.click("#tab-references")
    page.wait_for_selector("#classes li")
    assert page.locator("#class-options option").count() == 2
    new_file = tmp_path / "disc-new.png"
    new_file.write_bytes(synthetic_xray("disc", seed=777, size=(96, 96)))
    enrolled_before = live.queries.parent / "train" / "disc" / "disc-03.png"
    page.fill("#enroll-label", "disc")
    page.set_input_files("#enroll-files", [str(new_file), str(enrolled_before)])
    page.click("#enroll-button")
    page.wait_for_selector("#enroll-results tbody tr:nth-child(2):not(:has-text('sending'))")
    rows = page.locator("#enroll-results tbody tr")
    assert rows.nth(0).get_attribute("class") == "ok"
    assert rows.nth(0).locator("td").nth(1).inner_text() == "enrolled"
    assert rows.nth(1).get_attribute("class") == "duplicate"
    assert "duplicate" in rows.nth(1).locator("td").nth(1).inner_text()
    page.wait_for_selector("#classes button[data-label='disc'] small:has-text('11')")
    page.click("#classes button[data-label='disc']")
    wait_until(page, "document.querySelectorAll('#browse li').length === 11")
    wait_until(
        page,
        "[...document.querySelectorAll('#browse img')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
    )
    page.screenshot(path=str(shots / "references.png"), full_page=True)
    # admins delete (after a confirmation); the class count follows
    new_id = rows.nth(0).locator("td").nth(2).inner_text()
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"#browse li[data-reference-id='{new_id}'] button.danger")
    wait_until(page, "document.querySelectorAll('#browse li').length === 10")
    page.wait_for_selector("#classes button[data-label='disc'] small:has-text('10')")
    gone = httpx.get(f"{live.url}/references/{new_id}/image", headers=admin)
    assert gone.status_code == 404

    # -- Models and jobs: retrain, watch the progress reach done, roll back ----------------
    page.click("#tab-models")
    page.wait_for_selector(f"#models tr[data-version='{live.model_version}']")
    assert page.locator("#audit tbody tr").count() >= 1  # the prediction above, from the audit
    page.fill("#retrain-epochs", "2")
    page.fill("#retrain-image-size", "32")
    page.fill("#retrain-encoder", "resnet9_half")
    page.click("#retrain-button")
    page.wait_for_selector("#job:not([hidden])")
    seen: list[float] = []
    deadline = time.monotonic() + 300
    while page.get_attribute("#job", "data-status") not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, "the retraining job did not finish in 5 minutes"
        seen.append(float(page.evaluate("document.getElementById('job-progress').value")))
        time.sleep(0.25)
    assert page.get_attribute("#job", "data-status") == "succeeded", page.inner_text("#job")
    assert page.evaluate("document.getElementById('job-progress').value") == 1
    assert "100%" in page.inner_text("#job-status")
    assert seen == sorted(seen)  # the bar only moves forward
    wait_until(page, "document.querySelectorAll('#models tbody tr').length === 2")
    page.screenshot(path=str(shots / "models.png"), full_page=True)

    models = httpx.get(live.url + "/models", headers=admin).json()
    inactive = next(m["version"] for m in models if not m["active"])
    page.click(f"#models tr[data-version='{inactive}'] button.activate")
    page.wait_for_selector(f"#models tr.active[data-version='{inactive}']")
    active = [
        m["version"] for m in httpx.get(live.url + "/models", headers=admin).json() if m["active"]
    ]
    assert active == [inactive]
    # back to the original model, so other tests see the trained model they expect
    if inactive != live.model_version:
        page.click(f"#models tr[data-version='{live.model_version}'] button.activate")
        page.wait_for_selector(f"#models tr.active[data-version='{live.model_version}']")
    assert not [m for m in page.console_messages if "Content Security Policy" in m]


def test_reader_sees_the_403_when_enrolling(page: Any, live: LiveService, tmp_path: Path) -> None:
    sign_in(page, live, "reader")
    page.click("#tab-references")
    page.wait_for_selector("#classes li")
    upload = tmp_path / "stripes-new.png"
    upload.write_bytes(synthetic_xray("stripes", seed=4242, size=(96, 96)))
    page.fill("#enroll-label", "stripes")
    page.set_input_files("#enroll-files", str(upload))
    page.click("#enroll-button")
    page.wait_for_selector("#enroll-results tr.refused")
    text = page.inner_text("#enroll-results tr.refused")
    assert "refused: 403: This action needs the 'clinician' role" in text
    page.click("#tab-models")
    page.wait_for_selector("#models-error:not([hidden])")
    assert page.inner_text("#models-error").startswith("403: ")
    # an unknown key is refused at sign-in with the API's words
    page.click("#logout")
    page.fill("#api-key", "cxr_" + "x" * 43)
    page.click("#login-button")
    page.wait_for_selector("#login-error:not([hidden])")
    assert page.inner_text("#login-error").startswith("401: ")
    assert page.is_hidden("#app")


def test_labels_render_as_text_and_the_csp_blocks_inline_script(
    page: Any, live: LiveService
) -> None:
    clinician = {"X-API-Key": live.keys["clinician"]}
    image = synthetic_xray("stripes", seed=31337, size=(96, 96))
    created = httpx.post(
        live.url + "/references",
        headers=clinician,
        data={"label": XSS_LABEL},
        files={"file": ("x.png", image, "image/png")},
    )
    assert created.status_code == 201, created.text
    ref_id = created.json()["references"][0]["id"]
    try:
        sign_in(page, live, "clinician")
        page.click("#tab-references")
        chip = page.locator("#classes button.chip", has_text="onerror")
        chip.wait_for()
        assert chip.get_attribute("data-label") == XSS_LABEL
        assert chip.inner_text().startswith(XSS_LABEL)
        chip.click()
        page.wait_for_selector("#browse li")
        assert page.inner_text("#browse-label") == XSS_LABEL
        assert page.locator("#classes img, #browse-label img").count() == 0
        assert page.is_hidden("#browse li button.danger")  # deleting is for admins
        assert page.evaluate("window.__xss") is None

        # The CSP is in force: an inline script injected into the page does not run.
        page.evaluate(
            "() => { const s = document.createElement('script');"
            " s.textContent = 'window.__inline = 1'; document.body.append(s); }"
        )
        assert page.evaluate("window.__inline") is None
        assert any("Content Security Policy" in m for m in page.console_messages)
    finally:
        httpx.delete(f"{live.url}/references/{ref_id}", headers={"X-API-Key": live.keys["admin"]})


def test_diagnose_page_weight_and_drop_to_overlay_time(page: Any, live: LiveService) -> None:
    """The page adds little to /predict: KB transferred for the Diagnose page, and the time from
    a drop to the overlay on screen against the bare /predict latency, same image, same server."""
    transferred: dict[str, int] = {}
    page.on(
        "response",
        lambda r: transferred.__setitem__(r.url, len(r.body())) if r.status == 200 else None,
    )
    sign_in(page, live, "reader")
    page_bytes = sum(v for url, v in transferred.items() if "/ui/" in url or url.endswith("/"))
    assert 0 < page_bytes < 100_000, transferred

    query = live.queries / "stripes" / "stripes-01.png"
    reader = {"X-API-Key": live.keys["reader"]}
    data = query.read_bytes()
    with httpx.Client(base_url=live.url, headers=reader, timeout=60) as client:

        def bare() -> float:
            started = time.perf_counter()
            response = client.post("/predict?explain=true&k=5", files={"file": (query.name, data)})
            assert response.status_code == 200
            return (time.perf_counter() - started) * 1000

        bare()  # warm-up
        page_ms, bare_ms = [], []
        for _ in range(7):  # interleaved, so load on the shared machine hits both alike
            bare_ms.append(bare())
            page_ms.append(drop_image(page, query))
    page_p50, bare_p50 = statistics.median(page_ms), statistics.median(bare_ms)
    assert page.inner_text("#answer-label") == "stripes"
    row = {
        "page_kb": round(page_bytes / 1024, 1),
        "drop_to_overlay_p50_ms": round(page_p50, 1),
        "bare_predict_p50_ms": round(bare_p50, 1),
        "ratio": round(page_p50 / bare_p50, 2),
        "runs": len(page_ms),
    }
    out = os.environ.get("CXR_WEB_BENCH_OUT")
    if out:
        Path(out).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    # The page's own work (form data, JSON, base64 decode, paint) is small next to the model.
    assert page_p50 < 2 * bare_p50 + 250, row
