"""The whole journey in a real browser (Playwright driving Debian's headless Chromium):
upload an example file and see the preview, start training and see the loss chart get
points, reload the page and find the same run still updating, stop it, chat and get two
replies, download the adapter zip. Screenshots of every tab go to LORA_STUDIO_SCREENSHOTS
(docs/screenshots for the README) or to the test's temporary folder.

Chromium comes from Debian (`scripts/setup.sh --dev` installs it with apt-get when it is
missing); Playwright never downloads a browser. Without it the test skips, saying so.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import pytest

from tests.ui.conftest import ROOT, launch_app, stop_app

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("LORA_STUDIO_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
EXAMPLE = ROOT / "examples" / "json_answers.jsonl"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/setup.sh --dev (installs Debian's chromium with apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("browser")
    app = launch_app(root / "runs", tiny_llama_dir, root / "app.log")
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LORA_STUDIO_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_tab(page, tab_id: str) -> None:
    page.locator(f'button[role="tab"][data-tab-id="{tab_id}"]:visible').first.click()


# Points of a line plot that are really drawn: vega keeps one (invisible) hover symbol per
# point, and the line itself must have a colour (a plot can hold points and draw nothing).
DRAWN = """(id) => {
    const lines = [...document.querySelectorAll(`#${id} g.mark-line path`)];
    const stroked = lines.some(p => p.getAttribute('stroke') && (p.getAttribute('d') || '').includes('L'));
    return stroked ? document.querySelectorAll(`#${id} g.mark-symbol path`).length : 0;
}"""


def points(page, plot_id: str) -> int:
    return page.evaluate(DRAWN, plot_id)


def wait_points(page, plot_id: str, more_than: int) -> None:
    page.wait_for_function(f"(id) => ({DRAWN})(id) > {more_than}", arg=plot_id)


def progress_step(page) -> int:
    step = page.locator("#train-progress .train-progress").get_attribute("data-step", timeout=30_000)
    return int(step)


def fill_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(value)
    box.press("Tab")  # gradio takes the value on blur


def test_the_whole_journey(browser, studio, shots, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.set_default_timeout(60_000)
    page.goto(studio.url)

    # Data: upload an example file, see the validation summary, the rendered samples, the rows.
    page.set_input_files("#data-file input[type=file]", str(EXAMPLE))
    page.wait_for_selector("#data-summary :text('ready to train')")
    assert page.locator("#data-samples .token-trained").count() > 0
    assert page.locator("#data-samples .token-eos").count() > 0
    page.get_by_role("tab", name="First rows").click()
    page.wait_for_selector("#data-preview :text('How much is 2 + 11?')")
    page.get_by_role("tab", name="Lengths").click()
    page.wait_for_function("() => document.querySelectorAll('#data-histogram g.mark-rect path').length > 0")
    page.screenshot(path=str(shots / "data.png"), full_page=True)

    # Train: a long enough run on the tiny model that the page can be reloaded mid-run.
    open_tab(page, "train")
    page.wait_for_selector("#preflight :text('trainable parameters')")
    fill_number(page, "epochs", "40")
    fill_number(page, "batch-size", "4")
    fill_number(page, "lr", "0.001")
    page.locator("#train-start").click()
    page.wait_for_function(
        "() => /\\S+: training/.test(document.querySelector('#run-status').innerText)", timeout=120_000
    )
    run_id = re.match(r"(\S+): training", page.locator("#run-status").inner_text()).group(1)
    wait_points(page, "loss-plot", 4)
    wait_points(page, "loss-plot", points(page, "loss-plot"))  # and it keeps getting more
    assert points(page, "memory-plot") > 0 and points(page, "lr-plot") > 0
    page.screenshot(path=str(shots / "train.png"), full_page=True)

    # Reload: the page reattaches to the same run, redraws its history and keeps updating.
    before = progress_step(page)
    page.reload()
    open_tab(page, "train")
    page.wait_for_selector(f"#run-status :text('{run_id}: training')")
    wait_points(page, "loss-plot", before - 1)  # the history is redrawn from the run folder
    after_reload = progress_step(page)
    assert after_reload >= before
    page.wait_for_function(
        f"() => Number(document.querySelector('#train-progress .train-progress').dataset.step) > {after_reload}"
    )

    # Stop (save): the run ends as stopped, with its adapter.
    page.locator("#train-stop").click()
    page.wait_for_selector(f"#run-status :text('{run_id}: stopped')", timeout=120_000)
    assert (studio.runs_dir / run_id / "adapter" / "adapter_model.safetensors").exists()

    open_tab(page, "runs")
    page.wait_for_function(f"() => document.querySelector('#runs-table').innerText.includes('{run_id}')")
    assert "stopped" in page.locator("#runs-table").inner_text()
    page.locator("#runs-pick input").first.click()
    page.get_by_role("option", name=re.compile(re.escape(run_id))).first.click()
    wait_points(page, "runs-loss-plot", 0)
    page.screenshot(path=str(shots / "runs.png"), full_page=True)

    # Compare: one message, two replies (base left, tuned right).
    open_tab(page, "compare")
    page.wait_for_function(
        f"() => (document.querySelector('#compare-run input') || {{}}).value?.includes('{run_id}')"
    )
    page.locator("#chat-input textarea").fill("Say the word Paris")
    page.locator("#chat-send").click()
    page.wait_for_function(
        """() => ['chat-base', 'chat-tuned'].every(id => {
            const bot = document.querySelector(`#${id} [data-testid='bot']`);
            return bot && bot.innerText.trim().length > 0;
        })""",
        timeout=120_000,
    )
    assert page.locator("#chat-base [data-testid='user']").inner_text().strip() == "Say the word Paris"
    page.screenshot(path=str(shots / "compare.png"), full_page=True)

    # Export: build the adapter zip and download it through the page.
    open_tab(page, "export")
    page.wait_for_function(
        f"() => (document.querySelector('#export-run input') || {{}}).value?.includes('{run_id}')"
    )
    page.locator("#export-zip").click()
    link = page.locator("#export-zip-file a").first
    link.wait_for()
    with page.expect_download() as info:
        link.click()
    target = tmp_path / "adapter.zip"
    info.value.save_as(target)
    with zipfile.ZipFile(target) as zf:
        names = set(zf.namelist())
    assert f"{run_id}-adapter/adapter_config.json" in names and f"{run_id}-adapter/adapter_model.safetensors" in names
    page.screenshot(path=str(shots / "export.png"), full_page=True)
    page.close()


def test_a_bakeoff_of_two_methods_fills_its_leaderboard(browser, studio, shots):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(studio.url)
    page.set_input_files("#data-file input[type=file]", str(EXAMPLE))
    page.wait_for_selector("#data-summary :text('ready to train')")
    open_tab(page, "train")
    page.wait_for_selector("#preflight :text('trainable parameters')")
    fill_number(page, "batch-size", "4")
    page.locator("#train-advanced").get_by_text("Advanced").first.click()
    fill_number(page, "max-steps", "2")
    open_tab(page, "runs")
    page.locator("#bakeoff").get_by_text("Bake-off").first.click()
    methods = page.locator("#bakeoff-methods")
    assert methods.get_by_label("lora", exact=True).is_checked() and methods.get_by_label("dora", exact=True).is_checked()
    page.locator("#bakeoff-start").click()
    page.wait_for_selector("#bakeoff-message :text('in progress')")
    page.wait_for_selector("#bakeoff-message :text('finished')", timeout=240_000)
    board = page.locator("#bakeoff-board").inner_text()
    assert "lora" in board and "dora" in board
    bk_id = re.search(r"(bk\d{8}-\d{6}-[0-9a-f]{4})", page.locator("#bakeoff-message").inner_text()).group(1)
    folder = studio.runs_dir / ".bakeoffs" / bk_id
    rows = (folder / "leaderboard.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",," not in r.split(",", 2)[2] for r in rows[1:]), rows  # every column filled
    wait_points(page, "bakeoff-loss", 1)
    page.screenshot(path=str(shots / "bakeoff.png"), full_page=True)
    # A reload reopens the finished bake-off.
    page.reload()
    open_tab(page, "runs")
    page.locator("#bakeoff").get_by_text("Bake-off").first.click()
    page.wait_for_function(f"() => (document.querySelector('#bakeoff-pick input') || {{}}).value?.includes('{bk_id}')")
    page.wait_for_selector("#bakeoff-message :text('finished')")
