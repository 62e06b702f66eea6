"""`vqdiff serve` in a real browser: headless Chromium opens the page, types a prompt, presses Generate, waits for
the grid, and the image that arrived is the one the API gives for the same request.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and selenium (the dev extra).
`VQDIFF_SERVE_MODEL=DIR VQDIFF_SERVE_SCREENSHOT=docs/serve.png` serves another model and keeps the screenshot of
the finished page there (how docs/serve.png is made, with the quickstart's model)."""

import base64
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="vqdiff serve needs the serve extra: pip install 'vqdiff[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the dev extra)")
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("the browser test needs Chromium and its driver: apt-get install chromium chromium-driver",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from vqdiff.pipeline import load_pipeline  # noqa: E402
from vqdiff.serve.app import create_app  # noqa: E402

from vqdiff.serve.live import live_server  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "format_v1" / "vq_pipeline"


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_draws_what_the_api_draws(browser, tmp_path):
    model = os.environ.get("VQDIFF_SERVE_MODEL", str(FIXTURE))
    prompt = "a large red circle at the top left" if model != str(FIXTURE) else "a red circle"
    app = create_app(load_pipeline(model), max_batch=8)
    with live_server(app) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda driver: driver.find_element(By.ID, "generate").is_enabled())
        assert "parameters" in browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "prompt").send_keys(prompt)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda driver: driver.execute_script("return document.body.dataset.done === '1'"))
        status = browser.find_element(By.ID, "status").text
        source = browser.find_element(By.ID, "image").get_attribute("src")
        link = browser.find_element(By.ID, "download").get_attribute("href")
        shot = Path(os.environ.get("VQDIFF_SERVE_SCREENSHOT", tmp_path / "serve.png"))
        browser.save_screenshot(str(shot))
        # the page sent the defaults it showed: the same request through the API gives the same grid
        expected = httpx.post(url + "/api/generate", json={"prompt": prompt, "n": 4, "seed": 0}, timeout=120)
    assert status.startswith("done in") and link == source and source.startswith("data:image/png;base64,")
    assert base64.b64decode(source.split(",", 1)[1]) == expected.content
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
