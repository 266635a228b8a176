"""The web demo as a person uses it: a real Chromium uploads, picks a task, clicks and reads the page."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from kosmos_serve.demo.form import TASK_FIELDS
from kosmos_serve.grounding import iou
from kosmos_serve.tasks import Task

pytest.importorskip("selenium")
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as shows
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")  # gradio's own pandas use
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SHAPES = EXAMPLES / "shapes.png"  # 640x480
WAIT_S = 30


def wait(page, timeout: float = WAIT_S) -> WebDriverWait:
    return WebDriverWait(page, timeout)


def element(page, css: str):
    """The element at `css` once it is visible."""
    return wait(page).until(shows.visibility_of_element_located((By.CSS_SELECTOR, css)))


def shown(page, css: str) -> bool:
    return any(found.is_displayed() for found in page.find_elements(By.CSS_SELECTOR, css))


def upload(page, path: Path) -> None:
    page.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(path))
    element(page, "#image img")


def choose_task(page, task: Task) -> None:
    page.find_element(By.CSS_SELECTOR, "#task input").click()
    wait(page).until(shows.element_to_be_clickable((By.CSS_SELECTOR, f"[role=option][aria-label={task.value}]"))).click()
    hint = squeezed(TASK_FIELDS[task].hint.replace("`", ""))  # as the page renders it
    wait(page).until(lambda _: squeezed(page.find_element(By.CSS_SELECTOR, "#task-hint").text) == hint)


def squeezed(text: str) -> str:
    """`text` without whitespace (the browser breaks lines around inline code)."""
    return "".join(text.split())


def type_into(page, css: str, text: str) -> None:
    field = element(page, css)
    field.clear()
    field.send_keys(text)


def error_shown(page, words: str) -> str:
    """Wait for an error message on the page that contains `words`; return its text."""
    def message(_):
        texts = [toast.text for toast in page.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")]
        return next((text for text in texts if words in text), False)

    return wait(page, 15).until(message)


def css_rgb(value: str) -> tuple[int, int, int]:
    """`rgb(1, 2, 3)` or `rgba(1, 2, 3, 1)` -> (1, 2, 3)."""
    return tuple(int(part) for part in re.findall(r"\d+", value)[:3])


def test_an_uploaded_image_comes_back_with_its_entities_in_matching_colours(page):
    upload(page, SHAPES)
    choose_task(page, Task.REFERRING_GENERATION)
    type_into(page, "#boxes textarea", "60,150,260,350")
    page.find_element(By.CSS_SELECTOR, "#run").click()

    mark = element(page, "#text .kosmos-text mark.kosmos-entity")
    assert mark.text == "It"
    colour = css_rgb(mark.value_of_css_property("background-color"))
    x1, y1, x2, y2 = (int(v) for v in mark.get_attribute("title").split(","))  # the entity's pixel box
    assert (x1, y1, x2, y2) == (70, 157, 250, 352)  # the typed box, as the 32x32 location grid returns it

    shown_image = Image.open(io.BytesIO(httpx.get(element(page, "#annotated img").get_attribute("src")).content))
    assert shown_image.size == (640, 480)
    assert shown_image.convert("RGB").getpixel((x1 + 1, (y1 + y2) // 2)) == colour  # the box, in the span's colour
    assert "<phrase> It</phrase><object>" in page.find_element(By.CSS_SELECTOR, "#raw textarea").get_attribute("value")
    page.find_element(By.CSS_SELECTOR, "#result button").click()
    assert '"task":"referring_generation"' in squeezed(element(page, "#result-json").text)

    page.find_element(By.CSS_SELECTOR, "#download").click()
    downloaded = wait(page).until(lambda _: next(page.download_dir.glob("*.png"), False))
    time.sleep(0.2)  # Chromium renames the finished file into place; give it a moment to close it
    with Image.open(downloaded) as png:
        assert png.format == "PNG" and png.convert("RGB").tobytes() == shown_image.convert("RGB").tobytes()


def test_the_demo_model_finds_what_a_phrase_names_in_a_bundled_example(page):
    upload(page, EXAMPLES / "scene-four-shapes.png")  # a purple triangle, a pink square, a yellow cross, a blue circle
    choose_task(page, Task.REFERRING_COMPREHENSION)
    type_into(page, "#phrases textarea", "the blue circle")
    page.find_element(By.CSS_SELECTOR, "#run").click()

    mark = element(page, "#text .kosmos-text mark.kosmos-entity")
    assert mark.text == "the blue circle"
    box = [int(v) for v in mark.get_attribute("title").split(",")]
    assert iou(box, [134, 0, 221, 87]) >= 0.5  # the circle's true box, from the scene's record
    shown_image = Image.open(io.BytesIO(httpx.get(element(page, "#annotated img").get_attribute("src")).content))
    colour = css_rgb(mark.value_of_css_property("background-color"))
    assert shown_image.convert("RGB").getpixel((box[0], (box[1] + box[3]) // 2)) == colour  # its box, in its colour


def test_each_task_shows_the_inputs_it_reads(page):
    def inputs_shown(_) -> dict[str, bool]:
        return {css: shown(page, css) for css in ("#prompt", "#phrases", "#boxes", "#grounding")}

    for task in [*Task, Task.CAPTION]:  # ends where it began: every input hidden again
        choose_task(page, task)
        fields = TASK_FIELDS[task]
        wanted = {"#prompt": bool(fields.prompt), "#phrases": bool(fields.phrases), "#boxes": fields.boxes,
                  "#grounding": fields.grounding}
        wait(page, 10).until(lambda _, wanted=wanted: inputs_shown(_) == wanted, f"the inputs of {task.value}")
        for css, field in (("#prompt", fields.prompt), ("#phrases", fields.phrases)):
            if field:
                assert field.label in page.find_element(By.CSS_SELECTOR, css).text


def test_clicking_two_corners_on_the_image_types_a_box(page):
    upload(page, SHAPES)
    choose_task(page, Task.REFERRING_GENERATION)
    image = element(page, "#image img")
    scale = int(image.get_attribute("naturalWidth")) / image.rect["width"]
    centre = (image.rect["width"] / 2, image.rect["height"] / 2)
    for offset in ((60, 40), (-100, -50)):
        ActionChains(page).move_to_element_with_offset(image, *offset).click().perform()
        time.sleep(0.5)  # the first corner round-trips to the server before the second click
    wait(page, 10).until(lambda _: page.find_element(By.CSS_SELECTOR, "#boxes textarea").get_attribute("value"))
    box = [int(v) for v in page.find_element(By.CSS_SELECTOR, "#boxes textarea").get_attribute("value").split(",")]
    expected = [(centre[0] - 100) * scale, (centre[1] - 50) * scale, (centre[0] + 60) * scale, (centre[1] + 40) * scale]
    assert box == pytest.approx(expected, abs=3)


def test_mistakes_show_as_messages_never_as_tracebacks(page, tmp_path):
    page.find_element(By.CSS_SELECTOR, "#run").click()
    error_shown(page, "Upload an image or pick an example first.")

    page.find_element(By.CSS_SELECTOR, ".gallery-item").click()  # the first bundled example
    element(page, "#image img")
    first_example = min(EXAMPLES.glob("*.png"))
    width, height = Image.open(first_example).size
    choose_task(page, Task.REFERRING_GENERATION)
    type_into(page, "#boxes textarea", "1,2,3")
    page.find_element(By.CSS_SELECTOR, "#run").click()
    error_shown(page, "'1,2,3' is not a box; write x1,y1,x2,y2 in pixels")
    type_into(page, "#boxes textarea", f"0,0,{width + 50},10")
    page.find_element(By.CSS_SELECTOR, "#run").click()
    error_shown(page, f"lies outside the {width}x{height} image")

    type_into(page, "#boxes textarea", "0,0,10,10")
    page.find_element(By.CSS_SELECTOR, "#decoding button").click()
    type_into(page, "#max-new-tokens input", "0")
    page.find_element(By.CSS_SELECTOR, "#run").click()
    error_shown(page, "max_new_tokens: Must be between 1 and")

    garbage = tmp_path / "photo.png"
    garbage.write_bytes(b"\x89PNG not really an image" * 40)
    page.find_element(By.CSS_SELECTOR, "#image button[aria-label='Remove Image']").click()
    upload_input = wait(page).until(shows.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
    upload_input.send_keys(str(garbage))
    type_into(page, "#max-new-tokens input", "8")
    page.find_element(By.CSS_SELECTOR, "#run").click()
    error_shown(page, "The image cannot be decoded")
    assert "Traceback" not in page.page_source
