"""The admin in a real browser: Debian's headless Chromium driven by Selenium against a live server.

Flows: log in; create and edit a ticket; the stale-edit conflict; find a ticket's events in the
outbox list; requeue a dead outbox row; the operations dashboard with a real stream and consumer
(its screenshot lands in test-artifacts/dashboard.png).

Chromium and ChromeDriver come from Debian (``apt-get install chromium chromium-driver``, as
``.ci/run`` does); Selenium is told where they are and never downloads a browser.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.staticfiles.handlers import StaticFilesHandler
from django.core.handlers.wsgi import WSGIHandler
from django.core.management import call_command
from django.test import override_settings
from django.test.testcases import _MediaFilesHandler
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from listeners.models import DeadLetter
from outbox.models import OutboxEvent, OutboxStatus
from outbox.relay import Relay
from outbox.streams import stream_name
from tests.helpers import ROOT
from ticketing.models import Ticket
from ticketing.services import ticket_create, ticket_update

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "correct-horse-battery-staple-42"

pytestmark = [pytest.mark.django_db(transaction=True)]

WAIT = 20  # seconds: a bound on each wait, not a pause


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("the browser tests need Debian's browser: apt-get install chromium chromium-driver")
    previous = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        if previous is None:
            os.environ.pop("SE_OFFLINE", None)
        else:
            os.environ["SE_OFFLINE"] = previous


@pytest.fixture
def server(live_server) -> Iterator[str]:
    """The live server, speaking plain HTTP.

    The suite runs with production settings (DEBUG off), which redirect to HTTPS and mark
    cookies Secure. The session-scoped live server built its middleware when it started, so
    the app is rebuilt under the override for the duration of the test.
    """
    with override_settings(SECURE_SSL_REDIRECT=False, SESSION_COOKIE_SECURE=False, CSRF_COOKIE_SECURE=False):
        httpd = live_server.thread.httpd
        original = httpd.get_app()
        httpd.set_app(StaticFilesHandler(_MediaFilesHandler(WSGIHandler())))
        try:
            yield live_server.url
        finally:
            httpd.set_app(original)


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("ops", "ops@example.com", PASSWORD)


@pytest.fixture
def logged_in(browser: WebDriver, server: str, admin_user) -> WebDriver:
    browser.delete_all_cookies()
    _log_in(browser, server)
    return browser


def _wait(browser: WebDriver):
    return WebDriverWait(browser, WAIT)


def _log_in(browser: WebDriver, server: str) -> None:
    browser.get(f"{server}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys("ops")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "user-tools")))


def _submit(browser: WebDriver, name: str = "_save") -> None:
    browser.find_element(By.NAME, name).click()


def _messages(browser: WebDriver) -> str:
    _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, "ul.messagelist")))
    return browser.find_element(By.CSS_SELECTOR, "ul.messagelist").text


def _fill(browser: WebDriver, name: str, value: str) -> None:
    field = browser.find_element(By.NAME, name)
    field.clear()
    field.send_keys(value)


# --- flows ----------------------------------------------------------------------------


def test_staff_logs_in_and_sees_the_admin_index_with_the_operations_link(browser, server, admin_user):
    browser.delete_all_cookies()
    browser.get(f"{server}/admin/")
    _wait(browser).until(ec.url_contains("/admin/login/"))  # not logged in: sent to the login page

    _log_in(browser, server)

    assert "Tickets, outbox and listeners" in browser.find_element(By.ID, "content").text
    link = browser.find_element(By.ID, "operations-link")
    assert link.get_attribute("href") == f"{server}/admin/operations/"


def test_ticket_created_then_edited_in_the_admin_writes_each_event_to_the_outbox(logged_in, server):
    browser = logged_in
    browser.get(f"{server}/admin/ticketing/ticket/add/")
    _fill(browser, "title", "Browser concert")
    _fill(browser, "price", "42.50")
    _fill(browser, "user_id", "user-browser")
    _submit(browser)
    _wait(browser).until(ec.url_matches(r"/admin/ticketing/ticket/(\?.*)?$"))
    assert "Browser concert" in browser.find_element(By.ID, "result_list").text

    ticket = Ticket.objects.get(title="Browser concert")
    assert (ticket.price, ticket.user_id, ticket.version) == (Decimal("42.50"), "user-browser", 0)

    browser.get(f"{server}/admin/ticketing/ticket/{ticket.pk}/change/")
    _fill(browser, "price", "45")
    _submit(browser)
    _wait(browser).until(ec.url_matches(r"/admin/ticketing/ticket/(\?.*)?$"))

    ticket.refresh_from_db()
    assert (ticket.price, ticket.version) == (Decimal("45.00"), 1)
    events = OutboxEvent.objects.filter(aggregate_id=str(ticket.pk)).order_by("seq")
    assert [(e.subject, e.aggregate_version) for e in events] == [("ticket:created", 0), ("ticket:updated", 1)]


def test_stale_edit_is_refused_with_the_conflict_message_and_the_ticket_stays_as_the_other_writer_left_it(
    logged_in, server
):
    browser = logged_in
    ticket = ticket_create(title="Matinee", price="10", user_id="u1")
    browser.get(f"{server}/admin/ticketing/ticket/{ticket.pk}/change/")
    _wait(browser).until(ec.presence_of_element_located((By.NAME, "title")))

    # Someone else changes the ticket while the page is open.
    ticket_update(ticket_id=ticket.pk, expected_version=0, title="Matinee (moved)")

    _fill(browser, "title", "Matinee (my edit)")
    _submit(browser)
    error = _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".errorlist.nonfield")))

    assert "changed" in error.text and "Nothing was saved" in error.text
    assert browser.find_element(By.NAME, "title").get_attribute("value") == "Matinee (my edit)"  # input kept
    # The page names the ticket as stored, not as typed: heading, breadcrumbs and window title.
    heading = browser.find_element(By.CSS_SELECTOR, "#content > h2").text
    assert heading == "Matinee (moved) (10.00)", heading
    assert "Matinee (moved)" in browser.find_element(By.CSS_SELECTOR, ".breadcrumbs").text
    assert "my edit" not in browser.find_element(By.CSS_SELECTOR, ".breadcrumbs").text + browser.title
    ticket.refresh_from_db()
    assert (ticket.title, ticket.version) == ("Matinee (moved)", 1)
    assert OutboxEvent.objects.filter(aggregate_id=str(ticket.pk)).count() == 2
    _screenshot(browser, ARTIFACTS / "ticket-stale-edit.png")


def test_outbox_list_search_by_aggregate_id_finds_exactly_that_tickets_events(logged_in, server):
    browser = logged_in
    ticket = ticket_create(title="Recital", price="12", user_id="u1")
    ticket_update(ticket_id=ticket.pk, expected_version=0, price="15")
    other = ticket_create(title="Other", price="1", user_id="u2")

    browser.get(f"{server}/admin/outbox/outboxevent/")
    search = _wait(browser).until(ec.presence_of_element_located((By.NAME, "q")))
    search.send_keys(str(ticket.pk))
    search.submit()
    _wait(browser).until(ec.url_contains(f"q={ticket.pk}"))

    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    text = browser.find_element(By.ID, "result_list").text
    assert len(rows) == 2
    assert "ticket:created" in text and "ticket:updated" in text
    assert str(other.pk) not in text


def test_outbox_changelist_fits_a_1400px_window_without_horizontal_scrolling(logged_in, server):
    browser = logged_in
    assert browser.execute_script("return window.innerWidth") == 1400
    # Rows as wide as they get: long ids, every status, published ones with both dates and a sequence.
    for n in range(3):
        ticket = ticket_create(title=f"A rather long ticket title number {n}", price="99999.99", user_id="u" * 40)
        ticket_update(ticket_id=ticket.pk, expected_version=0, price="1")
    assert Relay().drain().published == 6
    lost = ticket_create(title="Lost", price="1", user_id="u")
    OutboxEvent.objects.filter(aggregate_id=str(lost.pk)).update(
        status=OutboxStatus.DEAD, attempts=12, last_error="nats: timeout " * 20
    )
    ticket_create(title="Pending", price="1", user_id="u")

    browser.get(f"{server}/admin/outbox/outboxevent/")
    _wait(browser).until(ec.presence_of_element_located((By.ID, "result_list")))
    widths = browser.execute_script(
        """
        const doc = document.documentElement, results = document.querySelector('#changelist .results');
        return {page: [doc.scrollWidth, doc.clientWidth], results: [results.scrollWidth, results.clientWidth]};
        """
    )
    _screenshot(browser, ARTIFACTS / "outbox-changelist.png")
    assert widths["page"][0] <= widths["page"][1], widths
    assert widths["results"][0] <= widths["results"][1], widths  # the table does not scroll sideways either
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")) == 8


def test_dead_outbox_row_is_requeued_with_the_changelist_action(logged_in, server):
    browser = logged_in
    ticket = ticket_create(title="Lost gig", price="3", user_id="u1")
    event = OutboxEvent.objects.get(aggregate_id=str(ticket.pk))
    OutboxEvent.objects.filter(pk=event.pk).update(status=OutboxStatus.DEAD, attempts=12, last_error="simulated")

    browser.get(f"{server}/admin/outbox/outboxevent/?status__exact=dead")
    box = _wait(browser).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f"input[name=_selected_action][value='{event.pk}']"))
    )
    box.click()
    action = Select(browser.find_element(By.NAME, "action"))
    (requeue,) = [o for o in action.options if o.text.lower().startswith("requeue")]
    action.select_by_value(requeue.get_attribute("value"))
    _submit(browser, "index")

    assert "requeued" in _messages(browser).lower()
    event.refresh_from_db()
    assert (event.status, event.attempts) == (OutboxStatus.PENDING, 0)


def test_operations_dashboard_shows_the_new_stream_and_consumer(logged_in, server):
    browser = logged_in
    ticket = ticket_create(title="Symphony", price="80", user_id="u1")
    ticket_update(ticket_id=ticket.pk, expected_version=0, price="75")
    ticket_create(title="Quartet", price="20", user_id="u2")
    assert Relay().drain().published == 3
    call_command("listen", "ticket:created", "ticket:updated", "--max-messages", "3", "--idle-exit", "30")
    # Something on both dead-letter lists, so the page shows them as an operator would.
    lost = ticket_create(title="Never sent", price="1", user_id="u3")
    OutboxEvent.objects.filter(aggregate_id=str(lost.pk)).update(
        status=OutboxStatus.DEAD, attempts=12, last_error="nats: timeout (simulated)"
    )
    DeadLetter.objects.create(
        consumer="replica-TICKETS",
        subject="ticket:updated",
        event_id="0d9c3f8e-3b1e-4f5e-9a52-1f3f0c0e9b11",
        stream=stream_name("TICKETS"),
        stream_sequence=99,
        error="PermanentFailure: price must be a number (simulated)",
        deliveries=20,
    )

    browser.get(f"{server}/admin/")
    browser.find_element(By.ID, "operations-link").click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "channels-table")))

    assert not browser.find_elements(By.ID, "nats-unreachable")
    stream = browser.find_element(By.CSS_SELECTOR, f"#channels-table tr[data-stream='{stream_name('TICKETS')}']")
    assert stream.find_elements(By.TAG_NAME, "td")[2].text == "3"  # messages
    consumer = browser.find_element(By.CSS_SELECTOR, "#clients-table tr[data-consumer='replica-TICKETS']")
    cells = [td.text for td in consumer.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == stream_name("TICKETS") and cells[3] == "0"  # caught up: nothing pending
    assert "ok" in cells[-1].lower()
    assert browser.find_elements(By.CSS_SELECTOR, "#throughput svg rect.bar")
    assert browser.find_elements(By.CSS_SELECTOR, "#dead-outbox-table tbody tr")
    assert browser.find_elements(By.CSS_SELECTOR, "#dead-letters-table tbody tr")

    _screenshot(browser, ARTIFACTS / "dashboard.png")


def _screenshot(browser: WebDriver, path: Path) -> None:
    """The whole page, however long: the viewport is set to the document's height first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width = browser.execute_script("return document.documentElement.clientWidth")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        assert browser.save_screenshot(str(path))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
