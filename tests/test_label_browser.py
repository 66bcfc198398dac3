"""The labelling page in a real headless Chromium (issue 22), through the README's toy round, command by command:
a round sampled with --sample-only, two prompts labelled by clicks and by keys, the page reloaded with its labels
kept, the round finished; then d3po.py --labels trains on the file the page wrote and the next round samples from
the result. The screenshot of the page goes to runs/screenshots/label_page.png (README.md shows one).

CI installs Chromium and its driver (.ci/run: Debian's chromium and chromium-driver); elsewhere the test is
skipped without them."""
import json
import os
import shlex
import shutil
import threading

import pytest
from safetensors.torch import load_file

from plumbing import bookkeeping
import d3po
from plumbing import label

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_round():
    """The commands of the toy round in docs/human_feedback.md: its second bash block."""
    with open(os.path.join(ROOT, "docs", "human_feedback.md"), encoding="utf-8") as f:
        section = f.read()
    block = section.split("```bash\n")[2].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


@pytest.fixture
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium and chromedriver (.ci/run installs Debian's chromium, chromium-driver)")
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--window-size=1280,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_a_person_labels_a_toy_round_in_chromium_and_d3po_trains_on_it(browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    sample, serve, train, sample_next = readme_round()
    assert [c[:2] for c in (sample, train, sample_next)] == [["python", "d3po.py"]] * 3
    assert serve[:3] == ["python", "-m", "plumbing.label"]
    monkeypatch.chdir(tmp_path)  # the README's rounds/ directories, here
    d3po.main(sample[2:])
    round1 = tmp_path / serve[3]
    with open(round1 / "prompts.txt", encoding="utf-8") as f:
        prompts = f.read().splitlines()
    assert len(prompts) == 6 and json.load(open(round1 / "config.json"))["images_per_prompt"] == 3

    ready, holder = threading.Event(), {}
    server = threading.Thread(target=label.serve, args=(serve[3], 0), daemon=True,
                              kwargs={"ready": lambda s: (holder.setdefault("server", s), ready.set())})
    server.start()
    assert ready.wait(30)
    wait = WebDriverWait(browser, 20)
    element = browser.find_element

    def text(id_):
        return element(By.ID, id_).text

    def until(condition, what):
        wait.until(lambda _: condition(), message=what)

    def keys(*pressed):
        ActionChains(browser).send_keys(*pressed).perform()

    def saved_scores():
        with open(round1 / "labels" / "alice.json", encoding="utf-8") as f:
            return [entry["scores"] for entry in json.load(f)]

    try:
        browser.get(f"http://127.0.0.1:{holder['server'].server_address[1]}/")
        until(lambda: element(By.ID, "name-input").is_displayed(), "the page asks for a name")
        element(By.ID, "name-input").send_keys("alice", Keys.ENTER)
        until(lambda: text("prompt-text") == prompts[0], "the first prompt is shown")
        assert text("progress-text") == "0 of 6 prompts labelled"
        image = element(By.CSS_SELECTOR, "#image-0 img")
        until(lambda: browser.execute_script("return arguments[0].naturalWidth", image) == 32, "its images load")
        assert image.size["width"] >= 128 and image.value_of_css_property("image-rendering") == "pixelated"

        # prompt 1 with clicks: the best, then the worst
        element(By.ID, "image-0").click()
        until(lambda: "best" in element(By.ID, "image-0").get_attribute("class"), "the click marks the best")
        element(By.ID, "image-2").click()
        until(lambda: text("prompt-text") == prompts[1], "an answer moves on to the next prompt")
        assert text("progress-text") == "1 of 6 prompts labelled"
        # prompt 2 with keys
        keys("2", "1")
        until(lambda: text("prompt-text") == prompts[2], "keys answer too")
        assert saved_scores() == [[1, 0, -1], [-1, 1, 0]] + [[None] * 3] * 4  # at once, in the --labels format

        # a reload keeps the labels and goes on where alice stopped
        browser.refresh()
        until(lambda: text("prompt-text") == prompts[2], "the reloaded page resumes at the prompt left")
        assert text("progress-text") == "2 of 6 prompts labelled" and text("annotator") == "alice"
        keys(Keys.ARROW_LEFT)
        until(lambda: text("prompt-text") == prompts[1], "the left arrow goes back")
        assert "best" in element(By.ID, "image-1").get_attribute("class")
        assert "worst" in element(By.ID, "image-0").get_attribute("class")
        keys(Keys.ARROW_RIGHT, "3")
        until(lambda: "best" in element(By.ID, "image-2").get_attribute("class"), "the third prompt's best")
        os.makedirs(os.path.join(ROOT, "runs", "screenshots"), exist_ok=True)
        browser.save_screenshot(os.path.join(ROOT, "runs", "screenshots", "label_page.png"))
        element(By.ID, "image-1").click()
        # the rest of the round with keys: A says a prompt's images are alike
        for p, answer in ((3, ("1", "2")), (4, ("a",)), (5, ("2", "3"))):
            until(lambda: text("prompt-text") == prompts[p], f"prompt {p + 1}")
            keys(*answer)
        until(lambda: element(By.ID, "done").is_displayed(), "the last answer finishes the round")
        assert "--labels" in text("train-command") and text("progress-text") == "6 of 6 prompts labelled"
        assert saved_scores() == [[1, 0, -1], [-1, 1, 0], [0, -1, 1], [1, -1, 0], [0, 0, 0], [0, 1, -1]]
    finally:
        holder["server"].shutdown()
        server.join(10)

    # d3po.py trains on the file the page wrote (two epochs of the README's ten: the test's time), and the next
    # round samples from the result
    d3po.main(train[2:] + ["--num-epochs", "2"])
    trained = tmp_path / train[train.index("--output-dir") + 1]
    assert bookkeeping.read_metrics(trained)[-1]["pairs"] == 15  # 3 pairs from each prompt but the alike one
    d3po.main(sample_next[2:])
    round2 = tmp_path / sample_next[sample_next.index("--output-dir") + 1]
    before, after = (load_file(str(r / "trajectories.safetensors"))["latents"] for r in (round1, round2))
    assert before[:, 0].equal(after[:, 0]) and not before[:, -1].equal(after[:, -1])  # one x_T, a new model
