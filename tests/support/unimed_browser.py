"""The web demo in a real headless browser: Debian's chromium and chromium-driver, driven by selenium as a person
clicks (tests/unimed/inference/test_unimed_browser.py), and the README's screenshot of it:

    python tests/support/unimed_browser.py RUN_DIR docs/images/unimed-demo.png   # a run folder of cmoe unimed train

starts ``cmoe unimed serve`` on RUN_DIR, picks example 3, asks REC about it and saves the page (≤ 150 KB PNG).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

CHROMIUM = ("chromium", "chromedriver")
"""The programs Debian's chromium and chromium-driver put on the PATH (make browser installs them)."""
WAIT_S = 120
"""Upper bound on any wait in the page (a bound against a hang, never a timing check)."""


def missing_browser() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    missing = [name for name in CHROMIUM if shutil.which(name) is None]
    if missing:
        return (f"{' and '.join(missing)} not on the PATH: install Debian's chromium and chromium-driver (make "
                "browser, or apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def start_browser(width: int = 1280, height: int = 1000):
    """Headless chromium (no sandbox: CI runs as root), the window `width` × `height`; nothing is downloaded."""
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's manager must not fetch a driver: Debian's is used
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


class Page:
    """The demo page open in `driver`, with what a person does on it."""

    def __init__(self, driver, url: str) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = WebDriverWait(driver, WAIT_S)
        driver.get(url)
        self.find("#ask")

    def find(self, css: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ready

        return self.wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, css)))

    def upload(self, path: Path) -> None:
        """Upload an image file, then wait until the page shows it."""
        self.find("#image input[type=file]").send_keys(str(Path(path).resolve()))
        self.wait.until(lambda d: d.find_elements("css selector", "#image img"))

    def pick_example(self, name: str) -> None:
        """Choose an example image in the dropdown, then wait until the page shows it."""
        from selenium.webdriver.common.by import By

        self.find("#example input").click()
        option = self.wait.until(lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "#example [role=option]")
                                            if o.text.strip() == name])
        option[0].click()
        self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))

    def choose_task(self, task: str) -> None:
        self.find(f"#task input[value='{task}']").click()

    def text(self) -> str:
        return self.find("#text textarea").get_property("value")

    def type_text(self, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find("#text textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        if text:
            box.send_keys(text)

    def ask(self, bars: bool = True) -> str:
        """Press Ask on a page with no answer yet and wait for the answer (and, with `bars`, the chart's bars);
        the answer as the page shows it."""
        assert not self.answer(), "ask() waits for the answer to appear: call it on a page that shows none"
        self.find("#ask").click()
        self.wait.until(lambda d: self.answer() and (not bars or self.bars()))
        return self.answer()

    def answer(self) -> str:
        return self.find("#answer textarea").get_property("value")

    def bars(self) -> list:
        """The expert chart's bars (SVG paths Vega draws, one per expert)."""
        return self.driver.find_elements("css selector", "#experts svg g.mark-rect path")

    def message(self, words: str) -> str:
        """The text of the page's message that contains `words` (waits for it)."""
        from selenium.webdriver.common.by import By

        xpath = f"//*[contains(text(), \"{words}\")]"
        found = self.wait.until(lambda d: [e for e in d.find_elements(By.XPATH, xpath)
                                           if e.is_displayed() and words in e.text])
        return found[0].text

    def screenshot(self) -> bytes:
        """The window as a PNG, scrolled to the top (the header names the model)."""
        self.driver.execute_script("window.scrollTo(0, 0);")
        return self.driver.get_screenshot_as_png()


def small_png(png: bytes, out: Path, limit: int = 150_000) -> int:
    """Write `png` to `out` as an adaptive-palette PNG (downscaled until it is under `limit` bytes); its size."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        data = io.BytesIO()
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(data, "PNG", optimize=True)
        if data.tell() <= limit:
            break
        image = image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data.getvalue())
    return data.tell()


def main(argv: list[str]) -> int:
    """Screenshot of the demo on a trained run folder: example 3 picked, REC asked, the answer, box and chart."""
    sys.path.insert(0, str(Path(__file__).parent))
    from unimed_server import Server

    from cmoe.reference_models.unimed.inference.examples import examples

    if len(argv) != 2:
        print("usage: python tests/support/unimed_browser.py RUN_DIR OUT.png", file=sys.stderr)
        return 2
    run, out = Path(argv[0]), Path(argv[1])
    reason = missing_browser()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    example = examples()[2]
    with tempfile.TemporaryDirectory() as scratch:
        server = Server(run, Path(scratch) / "logs")
        driver = start_browser(1200, 1080)
        try:
            page = Page(driver, server.url)
            page.choose_task("rec")
            page.pick_example(example.name)
            page.wait.until(lambda _: page.text() == example.texts["rec"])
            print(f"answer: {page.ask()}")
            page.wait.until(lambda d: d.find_elements("css selector", "#drawn img"))
            size = small_png(page.screenshot(), out)
        finally:
            driver.quit()
            server.stop()
    print(f"wrote {out} ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
