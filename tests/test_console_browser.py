"""The web console in a real browser: headless Chromium (Debian's ``chromium`` package, at
``/usr/bin/chromium`` or ``$MARS_CHROMIUM``) driven by Playwright for Python, against a real
``mars serve`` process on a temp MARS_HOME holding a real slice of the IKEA catalog, with the
VLM critic on a tiny random-init Qwen2-VL (its fast-path rationale is ``P(yes)=...``).

The server asks for API keys: an editor key and a viewer key are made with ``mars keys create``
before it starts. With ``MARS_SCREENSHOTS=1`` the search and ingest pages and the merchandising
rules are saved (1366x768) to ``docs/console-search.png``, ``docs/console-ingest.png`` and
``docs/console-rules.png``.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import REPO
from mars.wiring import CRITIC_NOT_SET_UP
from query.funnel import ABSENT_NOTES
from workers.local import served_api

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")

CHROMIUM = os.environ.get("MARS_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1366, "height": 768}
SCREENSHOTS = os.environ.get("MARS_SCREENSHOTS") == "1"
TIMEOUT_MS = 30_000
sync_api.expect.set_options(timeout=TIMEOUT_MS)  # searches with the critic on 2 busy cores can take seconds


@contextmanager
def mars_home_env(home: Path):
    """``MARS_HOME`` set to ``home`` for an in-process ``mars`` command, settings cache cleared."""
    from mars.settings import get_settings

    old = os.environ.get("MARS_HOME")
    os.environ["MARS_HOME"] = str(home)
    get_settings.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MARS_HOME", None)
        else:
            os.environ["MARS_HOME"] = old
        get_settings.cache_clear()


def create_key(home: Path, name: str, role: str) -> str:
    """``mars keys create --name NAME --role ROLE --json`` on ``home``; the key."""
    from typer.testing import CliRunner

    from mars.cli import app

    with mars_home_env(home):
        result = CliRunner().invoke(app, ["keys", "create", "--name", name, "--role", role, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["key"]


@pytest.fixture(scope="module")
def server(ikea_slice, tiny_qwen2vl_dir, tmp_path_factory):
    """``mars serve`` on a free port with the IKEA slice ingested through its bulk API."""
    home = tmp_path_factory.mktemp("console") / "mars"
    keys = {"editor": create_key(home, "console test", "editor"), "viewer": create_key(home, "console viewer", "viewer")}
    env = {"MARS_HOME": str(home), "MARS_CRITIC": "vlm", "MARS_CRITIC_MODEL": str(tiny_qwen2vl_dir),
           "MARS_CRITIC_RATIONALE_TOP_K": "0", "MARS_RATE_LIMIT": ""}
    with served_api(env, home.parent / "serve.log") as url:
        auth = {"Authorization": f"Bearer {keys['editor']}"}
        job = httpx.post(f"{url}/v1/items:bulk", json={"path": str(ikea_slice["corpus"])}, headers=auth, timeout=30)
        assert job.status_code == 202, job.text
        status_url = url + job.json()["status_url"]
        deadline = time.monotonic() + 120
        while (progress := httpx.get(status_url, headers=auth, timeout=10).json())["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, progress
            time.sleep(0.3)
        assert progress["status"] == "done" and progress["indexed"] == len(ikea_slice["records"]), progress
        yield {"url": url, "keys": keys, "slice": ikea_slice, "home": home}


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (or set MARS_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_console(page, server, key: str | None = "editor", hash_: str = "") -> None:
    """Load the console from ``/`` (redirect), save ``key`` in the header bar's key field."""
    page.goto(server["url"] + "/" + hash_)
    assert "/console/" in page.url
    # A fresh browser has no key: the console's first request is refused and it says so.
    sync_api.expect(page.locator("#notice")).to_contain_text("needs an API key (401)")
    if key is not None:
        page.get_by_label("API key").fill(server["keys"][key])
        page.get_by_label("API key").press("Enter")
        sync_api.expect(page.locator("#key-state")).to_have_text("Key saved.")
        sync_api.expect(page.locator("#category optgroup[label=Classes] option").first).to_be_attached()
        sync_api.expect(page.locator("#notice")).to_be_hidden()


def shoot(page, name: str) -> None:
    if SCREENSHOTS:
        (REPO / "docs").mkdir(exist_ok=True)
        page.screenshot(path=str(REPO / "docs" / name))


def test_console_asks_for_a_key_and_says_why_when_refused(page, server):
    open_console(page, server, key=None)
    notice = page.locator("#notice")
    sync_api.expect(notice).to_be_visible()
    sync_api.expect(notice).to_contain_text("Enter a valid key in the “API key” field")
    sync_api.expect(page.get_by_label("API key")).to_have_attribute("aria-invalid", "true")

    # Every form control has an accessible name (a label or aria-label).
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id || e.outerHTML)""")
    assert unnamed == []
    # Focus order: the query box, then the room photo's file picker, then the category.
    page.get_by_label("What are you looking for?").focus()
    order = []
    for _ in range(3):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["room-file", "category", "mode"]

    open_console(page, server, key="viewer")  # a viewer may read: the categories load
    page.get_by_role("link", name="Ingest").click()
    page.get_by_label("One product per line").fill(json.dumps({"id": "sku-x", "title": "Stool"}))
    page.get_by_role("button", name="Start bulk job", exact=True).click()
    sync_api.expect(notice).to_contain_text("not allowed to do that (403)")
    sync_api.expect(notice).to_contain_text("editor")  # the server's reason is shown


def test_search_with_a_room_photo_shows_cards_with_photos_and_rationales(page, server):
    open_console(page, server)
    room = server["slice"]["room"]
    page.get_by_label("Choose a photo…").set_input_files(str(room))
    sync_api.expect(page.get_by_alt_text("Preview of the room photo")).to_be_visible()
    assert page.eval_on_selector("#room-preview", "img => img.complete && img.naturalWidth") > 0

    query = page.get_by_label("What are you looking for?")
    query.fill("a lamp for this bedroom")
    sync_api.expect(page.locator('#mode option[value="full"]')).to_be_enabled()  # this server has a critic
    sync_api.expect(page.locator("#mode-note")).to_be_hidden()
    query.press("Enter")  # keyboard search, category lock on: the lock's why names the lamp class
    sync_api.expect(page.locator("#lock-what")).to_have_text("lamp (class)")
    sync_api.expect(page.locator("#lock-reason")).not_to_be_empty()
    # A hybrid search has no critic line; nothing is trained on this server: the header says what is missing.
    sync_api.expect(page.locator("#critic-line")).to_be_hidden()
    sync_api.expect(page.locator("#stages-line")).to_be_visible()
    sync_api.expect(page.locator("#stages-what")).to_have_text(f"{ABSENT_NOTES['aligned']} {ABSENT_NOTES['whitening']}")

    # The slice has few lamps: the whole-room search (auto lock off) in mode full with the critic.
    page.get_by_label("Auto lock category from the text").uncheck()
    page.get_by_label("Mode").select_option("full")
    page.get_by_label("Room photo", exact=True).focus()  # the image list's slider, labelled from GET /v1/retrievers
    page.keyboard.press("ArrowRight")  # 1.00 -> 1.05 by keyboard
    sync_api.expect(page.locator("#w-image-out")).to_have_text("1.05")
    with page.expect_request(lambda r: r.url.endswith("/v1/search")) as sent:
        query.press("Enter")
    body = sent.value.post_data_json
    assert body["mode"] == "full" and body["auto_lock"] is False and body["weights"] == {"image": 1.05}
    assert body["image_base64"] and sent.value.headers["authorization"] == f"Bearer {server['keys']['editor']}"

    sync_api.expect(page.locator("#search-status")).to_contain_text("full mode")
    cards = page.locator("#results .card")
    assert cards.count() >= 10
    sync_api.expect(page.locator("#lock-why")).to_be_visible()
    sync_api.expect(page.locator("#lock-what")).to_have_text("none")
    assert page.locator("#lock-reason").inner_text().strip()
    sync_api.expect(page.locator("#critic-line")).to_be_visible()
    sync_api.expect(page.locator("#critic-line")).to_contain_text("qwen2-vl — scored 20 items — Qwen2-VL critic")
    assert "/" not in page.locator("#critic-line").inner_text()  # no model path
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .card img')].filter(i => i.complete && i.naturalWidth > 0).length"
        " === document.querySelectorAll('#results .card').length")
    for i in range(cards.count()):
        card = cards.nth(i)
        assert card.locator("img").evaluate("img => img.naturalWidth") > 0
        assert card.locator(".rationale").inner_text().strip().startswith("Critic")
        assert "P(yes)=" in card.locator(".rationale").inner_text()
        assert card.locator(".card-title").inner_text().strip()
        assert card.locator(".ranks dd").count() == 4
    shoot(page, "console-search.png")

    # A card's title opens its item page; going back returns to the same results.
    first_id = cards.first.get_attribute("data-id")
    cards.first.locator(".card-title a").click()
    sync_api.expect(page).to_have_url(f"{server['url']}/console/#/item/{first_id}")
    sync_api.expect(page.locator("#item-body dd").first).to_have_text(first_id)
    page.go_back()
    sync_api.expect(cards.first.locator(".card-title a")).to_be_focused()


def test_without_a_critic_the_full_mode_is_off_and_says_why(page, server, tmp_path):
    """A second server on an empty MARS_HOME with the default learned critic, never trained: the
    console learns it from GET /healthz (no key needed) and disables the full mode, saying why in
    plain words; a search's header has no critic line."""
    home = tmp_path / "mars"
    home.mkdir()
    first = Path(server["home"]) / "models"
    if first.is_dir():
        (home / "models").symlink_to(first)  # the first server's encoder exports: no second export
    viewer = create_key(home, "no-critic viewer", "viewer")
    with served_api({"MARS_HOME": str(home), "MARS_RATE_LIMIT": ""}, tmp_path / "serve.log") as url:
        assert httpx.get(f"{url}/healthz").json()["critic_note"] == CRITIC_NOT_SET_UP
        page.goto(url + "/console/")
        full = page.locator('#mode option[value="full"]')
        sync_api.expect(full).to_be_disabled()  # before any key: /healthz needs none
        sync_api.expect(full).to_have_text("full (no critic)")
        plain = CRITIC_NOT_SET_UP.replace("`", "")  # the console shows `mars setup` as code
        sync_api.expect(full).to_have_attribute("title", plain)
        note = page.locator("#mode-note")
        sync_api.expect(note).to_be_visible()
        sync_api.expect(note).to_have_text(f"Full mode is off. {plain}")
        sync_api.expect(note.locator("code")).to_have_text("mars setup")
        sync_api.expect(page.get_by_label("Mode")).to_have_attribute("aria-describedby", "mode-note")
        sync_api.expect(page.get_by_label("Mode")).to_have_value("hybrid")

        page.get_by_label("API key").fill(viewer)
        page.get_by_label("API key").press("Enter")
        sync_api.expect(page.locator("#key-state")).to_have_text("Key saved.")
        query = page.get_by_label("What are you looking for?")
        query.fill("a lamp")
        query.press("Enter")
        sync_api.expect(page.locator("#search-status")).to_contain_text("(hybrid mode)")
        sync_api.expect(page.locator("#critic-line")).to_be_hidden()
        sync_api.expect(page.locator("#stages-what")).to_have_text(ABSENT_NOTES["aligned"])
        sync_api.expect(full).to_be_disabled()
        sync_api.expect(note).to_have_text(f"Full mode is off. {plain}")


def test_room_photo_by_drag_and_drop(page, server):
    open_console(page, server)
    data = list(server["slice"]["room"].read_bytes())
    page.evaluate("""data => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(data)], 'room.jpg', {type: 'image/jpeg'}));
        const zone = document.getElementById('drop-zone');
        for (const type of ['dragenter', 'dragover', 'drop'])
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", data)
    sync_api.expect(page.locator("#room-name")).to_have_text("room.jpg")
    page.wait_for_function("() => document.getElementById('room-preview').naturalWidth > 0")
    page.get_by_role("button", name="Remove photo").click()
    sync_api.expect(page.locator("#room-figure")).to_be_hidden()


def test_item_page_shows_the_item(page, server, ikea):
    record = next(r for r in server["slice"]["records"] if r["image"])
    open_console(page, server, hash_=f"#/item/{record['_id']}")
    sync_api.expect(page.locator("#item-heading")).to_have_text(record["title"])
    sync_api.expect(page.locator("#item-body dd").first).to_have_text(record["_id"])
    page.wait_for_function("() => (document.querySelector('.item-img') || {}).naturalWidth > 0")
    image = httpx.get(f"{server['url']}/v1/items/{record['_id']}/image",
                      headers={"Authorization": f"Bearer {server['keys']['viewer']}"})
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == (ikea / record["image"]).read_bytes()
    assert httpx.get(f"{server['url']}/v1/items/{record['_id']}/image").status_code == 401


def test_ingest_page_runs_a_bulk_job_to_100_percent_and_lists_it(page, server, ikea):
    open_console(page, server, hash_="#/ingest")
    photo = str(ikea / next(r["image"] for r in server["slice"]["records"] if r["image"]))
    lines = [
        {"id": "console-1", "title": "Console test lamp", "type": "Table lamp", "colour": "white", "image": photo},
        {"id": "console-2", "title": "Console test rug", "type": "Rug, flatwoven", "colour": "blue"},
        {"id": "console-3", "title": "Console test stool", "type": "Stool", "colour": "oak"},
    ]
    page.get_by_label("One product per line").fill("\n".join(json.dumps(r) for r in lines) + "\n{broken")
    page.get_by_role("button", name="Start bulk job", exact=True).click()
    progress = page.locator("#ingest-job progress")
    sync_api.expect(progress).to_have_attribute("value", "100")
    panel = page.locator("#ingest-job")
    sync_api.expect(panel.locator("h2")).to_contain_text("done")
    sync_api.expect(panel).to_contain_text("4 of 4 records: indexed 3")
    sync_api.expect(panel.locator(".rejections li")).to_contain_text("Record 4")
    shoot(page, "console-ingest.png")

    job_title = panel.locator("h2").inner_text().split(" ")[1]  # "#N"
    page.get_by_role("link", name="Jobs").click()
    row = page.locator("#jobs-table tbody tr").filter(has_text=job_title)
    sync_api.expect(row).to_contain_text("done")
    sync_api.expect(row.locator("progress")).to_have_attribute("value", "100")


# ---------------------------------------------------------------- merchandising rules

RUGS = "a rug for the living room"  # locks to the rug class; the slice has several rugs


@pytest.fixture
def no_rules_left(server):
    """Rules made by a test are gone after it (the server is shared by the module)."""
    yield
    auth = {"Authorization": f"Bearer {server['keys']['editor']}"}
    for rule in httpx.get(f"{server['url']}/v1/rules", headers=auth).json():
        httpx.delete(f"{server['url']}/v1/rules/{rule['id']}", headers=auth)


def search_text(page, text: str) -> list[str]:
    """Search ``text`` from the query box (hybrid mode); the ids of the result cards."""
    query = page.get_by_label("What are you looking for?")
    query.fill(text)
    with page.expect_response(lambda r: r.url.endswith("/v1/search")):
        query.press("Enter")
    sync_api.expect(page.locator("#search-status")).to_contain_text("hybrid mode")
    return card_ids(page)


def card_ids(page) -> list[str]:
    return page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")


def test_pin_from_a_card_then_turn_off_and_delete_it_in_the_rules_panel(page, server, no_rules_left):
    open_console(page, server)
    before = search_text(page, RUGS)
    sync_api.expect(page.locator("#lock-what")).to_have_text("rug (class)")
    assert len(before) >= 5
    target = before[-1]  # the last card, pinned to the top by keyboard
    sync_api.expect(page.get_by_label("Pin / Boost / Bury on a card apply to")).to_contain_text("auto: the lock rug (class)")
    title = page.locator(f'#results .card[data-id="{target}"] .card-title a').inner_text()
    page.locator(f'#results .card[data-id="{target}"]').get_by_role("button", name="Pin").focus()
    page.keyboard.press("Enter")

    confirm = page.locator("#rule-confirm")
    sync_api.expect(confirm).to_contain_text(f"added: pin {title} at #1 for searches locked to rug (class)")
    cards = page.locator("#results .card")
    sync_api.expect(cards.first).to_have_attribute("data-id", target)
    sync_api.expect(page.locator("#search-status")).to_contain_text("re-run after rule")
    notes = cards.first.locator(".card-rules .rule-notes")
    sync_api.expect(notes).to_have_text(re.compile(r"pinned at #1 by rule \d+"))
    rule_id = int(re.search(r"rule (\d+)", notes.inner_text()).group(1))
    assert card_ids(page) == [target, *before[:-1]]
    sync_api.expect(cards.first.get_by_role("button", name="Pin")).to_be_focused()  # keyboard focus stays on the product
    auth = {"Authorization": f"Bearer {server['keys']['editor']}"}
    stored = httpx.get(f"{server['url']}/v1/rules/{rule_id}", headers=auth).json()
    assert (stored["kind"], stored["product_id"], stored["position"], stored["category"], stored["query_pattern"]) == \
        ("pin", target, 1, "rug", None)

    # The rules panel (a disclosure, opened by keyboard) lists it; turn it off: the order is back.
    page.locator("#rules-panel > summary").focus()
    page.keyboard.press("Enter")
    row = page.locator(f'#rules-table tr[data-rule="{rule_id}"]')
    sync_api.expect(row).to_contain_text("pin")
    sync_api.expect(row).to_contain_text("lock rug")
    sync_api.expect(row).to_contain_text("#1")
    sync_api.expect(page.locator("#rules-count")).to_have_text("— 1 rule, 1 active")
    toggle = page.get_by_label(f"Rule {rule_id} active")
    sync_api.expect(toggle).to_be_checked()
    toggle.focus()
    page.keyboard.press("Space")
    sync_api.expect(page.locator("#search-status")).to_contain_text(f"rule {rule_id} was turned off")
    assert card_ids(page) == before
    sync_api.expect(row).to_have_class(re.compile("inactive"))
    sync_api.expect(page.get_by_label(f"Rule {rule_id} active")).not_to_be_checked()
    sync_api.expect(page.locator("#rules-count")).to_have_text("— 1 rule, 0 active")

    page.get_by_label(f"Rule {rule_id} active").press("Space")  # on again: pinned again
    sync_api.expect(page.locator("#search-status")).to_contain_text(f"rule {rule_id} was turned on")
    assert card_ids(page)[0] == target

    page.get_by_role("button", name=f"Delete rule {rule_id}").press("Enter")
    sync_api.expect(page.locator("#search-status")).to_contain_text(f"rule {rule_id} was deleted")
    assert card_ids(page) == before
    sync_api.expect(row).to_have_count(0)
    sync_api.expect(page.locator("#rules-count")).to_have_text("— none yet")
    assert cards.first.locator(".rule-notes").count() == 0
    assert httpx.get(f"{server['url']}/v1/rules/{rule_id}", headers=auth).status_code == 404


def test_a_viewer_key_gets_the_403_message_when_pinning(page, server, no_rules_left):
    open_console(page, server, key="viewer")
    before = search_text(page, RUGS)
    page.locator("#results .card").nth(2).get_by_role("button", name="Pin").click()
    notice = page.locator("#notice")
    sync_api.expect(notice).to_contain_text("not allowed to do that (403)")
    sync_api.expect(notice).to_contain_text("editor")
    sync_api.expect(page.locator("#rule-confirm")).to_be_hidden()
    assert card_ids(page) == before
    auth = {"Authorization": f"Bearer {server['keys']['viewer']}"}
    assert httpx.get(f"{server['url']}/v1/rules", headers=auth).json() == []


def test_rules_form_adds_a_synonym_shown_above_the_results_and_explains_a_422(page, server, no_rules_left):
    open_console(page, server)
    page.locator("#rules-panel > summary").click()
    page.get_by_label("Kind").select_option("synonym")
    sync_api.expect(page.get_by_label("Product ID")).to_be_hidden()
    page.get_by_label("Term").fill("carpet")
    page.get_by_label("Replacement").fill("rug")
    page.get_by_role("button", name="Add rule").click()
    status = page.locator("#rule-form-status")
    sync_api.expect(status).to_contain_text("search 'carpet' as 'rug' on every search")
    synonym_id = int(re.search(r"Rule (\d+)", status.inner_text()).group(1))

    search_text(page, "a carpet for the living room")
    sync_api.expect(page.locator("#synonyms-line")).to_be_visible()
    sync_api.expect(page.locator("#synonyms-what")).to_have_text(f"'carpet' → 'rug' by rule {synonym_id}")
    sync_api.expect(page.locator("#rewritten-text")).to_have_text("a rug for the living room")

    # An invalid rule: 422 with the server's reason, in the form and in the notice.
    page.get_by_label("Kind").select_option("boost")
    sync_api.expect(page.get_by_label("Factor")).to_have_value("1.5")
    page.get_by_label("Product ID").fill("no-such-product")
    page.get_by_role("button", name="Add rule").click()
    sync_api.expect(status).to_contain_text("Not added: Error 422")
    sync_api.expect(status).to_contain_text("no product 'no-such-product' in the catalog")
    sync_api.expect(page.locator("#notice")).to_contain_text("Error 422")

    # A rugs search with a pin and a boost from the cards: the cards say which rule did what.
    ids = search_text(page, RUGS)
    sync_api.expect(page.locator("#synonyms-line")).to_be_hidden()
    page.locator(f'#results .card[data-id="{ids[3]}"]').get_by_role("button", name="Pin").click()
    sync_api.expect(page.locator("#results .card").first).to_have_attribute("data-id", ids[3])
    page.locator(f'#results .card[data-id="{ids[-1]}"]').get_by_role("button", name="Boost").click()
    boosted = page.locator(f'#results .card[data-id="{ids[-1]}"] .rule-notes')
    sync_api.expect(boosted).to_contain_text("boosted x1.5 by rule")
    sync_api.expect(page.locator("#rules-table tbody tr")).to_have_count(3)
    sync_api.expect(page.locator("#notice")).to_be_hidden()  # the next successful call cleared the 422
    sync_api.expect(status).to_be_empty()
    if SCREENSHOTS:  # the confirmation, the rules and the cards with their rules in view
        page.wait_for_function("() => [...document.querySelectorAll('#results .card img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.evaluate("""() => window.scrollBy(0, document.getElementById('rule-confirm').getBoundingClientRect().top
                                            - document.querySelector('.topbar').offsetHeight - 12)""")
        shoot(page, "console-rules.png")


# ---------------------------------------------------------------- waiting for a search

SPOKEN_CHANGES = """() => {
    // Count the changes to what a screen reader would hear from the status line (a polite live
    // region): mutations outside its aria-hidden parts. The ticking seconds must not count.
    window.spokenChanges = 0;
    window.hiddenChanges = 0;
    new MutationObserver((records) => {
        for (const r of records) {
            const node = r.target.nodeType === Node.ELEMENT_NODE ? r.target : r.target.parentElement;
            if (node.closest('[aria-hidden="true"]')) window.hiddenChanges++; else window.spokenChanges++;
        }
    }).observe(document.getElementById('search-status'), {subtree: true, childList: true, characterData: true});
}"""


def test_status_line_counts_the_seconds_and_says_when_a_new_room_photo_is_analysed(page, server):
    """The browser holds each POST /v1/search (page.route) until the test lets it go, so the
    in-flight status can be read for as long as needed: "Analysing room photo… N s" for a photo
    not yet searched on this page (a failed search does not count), "Searching…" for the same
    photo again (same bytes, another file name); the results replace it."""
    open_console(page, server)
    held = []  # the routes of searches the browser has sent, not yet answered
    page.route("**/v1/search", lambda route: held.append(route))
    status = page.locator("#search-status")
    seconds = status.locator(".wait-seconds")
    query = page.get_by_label("What are you looking for?")
    query.fill("a lamp for this bedroom")
    room = server["slice"]["room"]
    page.get_by_label("Choose a photo…").set_input_files(str(room))
    sync_api.expect(status).to_have_attribute("role", "status")
    sync_api.expect(status).to_have_attribute("aria-live", "polite")

    def search_and_hold(words: str):
        query.press("Enter")
        sync_api.expect(status.locator(".wait-text")).to_have_text(words)
        deadline = time.monotonic() + 10
        while not held:
            assert time.monotonic() < deadline, "the search request was not sent"
            page.wait_for_timeout(20)
        sync_api.expect(page.locator("#search-button")).to_be_disabled()
        sync_api.expect(seconds).to_have_attribute("aria-hidden", "true")
        sync_api.expect(seconds).to_have_text(re.compile(r"^\d+\.\d s$"))
        return held.pop()

    def seconds_grow() -> None:
        """The seconds tick (every 100 ms) while what a screen reader hears stays the same."""
        first = float(seconds.inner_text().removesuffix(" s"))
        page.evaluate(SPOKEN_CHANGES)
        page.wait_for_function("""s => parseFloat(document.querySelector('#search-status .wait-seconds').textContent)
                                       >= s + 0.3""", arg=first)
        assert page.evaluate("window.hiddenChanges") >= 3
        assert page.evaluate("window.spokenChanges") == 0

    # A new photo; the search fails (the request is aborted): the error shows, the counting stops.
    route = search_and_hold("Analysing room photo…")
    seconds_grow()
    route.abort()
    sync_api.expect(status).to_have_text("The search failed.")
    sync_api.expect(page.locator("#notice")).to_contain_text("Cannot reach the MARS server")
    page.wait_for_timeout(300)
    sync_api.expect(status).to_have_text("The search failed.")
    assert status.get_attribute("class") == "search-status"

    # The same photo again: the failed search did not analyse it, so it is still new. Its results replace the line.
    route = search_and_hold("Analysing room photo…")
    assert status.get_attribute("data-waiting") == "new-photo"
    seconds_grow()
    sync_api.expect(page.locator("#results")).to_have_attribute("aria-busy", "true")
    route.continue_()
    sync_api.expect(status).to_contain_text(re.compile(r"\d+ results? in \d+(\.\d)? m?s \(hybrid mode\)"))
    sync_api.expect(seconds).to_have_count(0)
    assert page.locator("#results .card").count() >= 1
    assert page.locator("#results").get_attribute("aria-busy") is None
    sync_api.expect(page.locator("#notice")).to_be_hidden()

    # The same bytes under another file name: known now, so a plain "Searching…".
    page.get_by_label("Choose a photo…").set_input_files(
        files=[{"name": "same-room.jpg", "mimeType": "image/jpeg", "buffer": room.read_bytes()}])
    sync_api.expect(page.locator("#room-name")).to_have_text("same-room.jpg")
    route = search_and_hold("Searching…")
    assert "Analysing" not in status.inner_text()
    assert status.get_attribute("data-waiting") == "search"
    seconds_grow()
    route.continue_()
    sync_api.expect(status).to_contain_text("(hybrid mode)")
    sync_api.expect(seconds).to_have_count(0)
    assert not held
