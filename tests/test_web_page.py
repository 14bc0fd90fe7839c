"""The dashboard's web page in a real browser (Debian's chromium, headless) on the real app, Redis and agents."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from playwright.async_api import Page, async_playwright, expect
from pydantic import SecretStr
from starlette.routing import Mount

import agentcomms.web
from agentcomms import AgentMessage, BaseAgent, Settings
from agentcomms.examples import TwinAgent, create_agent_config
from agentcomms.schemas import id_time_ms
from agentcomms.web import create_app
from test_record import engineer, strategist

STATIC = Path(agentcomms.web.__file__).parent / "static"
IMAGES = Path(__file__).parents[1] / "docs" / "images"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "page-token-for-tests"
expect.set_options(timeout=15_000)  # the agents list refreshes every 5 s: a wait may span two refreshes

pytestmark = [
    pytest.mark.record,  # the record on, as a dashboard's agents would keep it
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="needs a browser (Debian package chromium)"
    ),
]


class Picky(BaseAgent):
    """Fails on ``review_budget`` while ``broken`` (one delivery allowed: dead-lettered at once), then handles it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broken = True
        self.reviewed: asyncio.Queue[AgentMessage] = asyncio.Queue()

    async def handle_review_budget(self, message: AgentMessage) -> None:
        if self.broken:
            raise RuntimeError("the budget spreadsheet is locked")
        self.reviewed.put_nowait(message)


def dashboard_app(settings: Settings) -> FastAPI:
    """The real app; the page's folder mounted at ``/`` unless the app already serves it."""
    app = create_app(settings)
    if not any(isinstance(route, Mount) and route.path in ("", "/") for route in app.routes):
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn in this event loop on a free port of 127.0.0.1; yield its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", ws="none", lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    task.result()
                    raise AssertionError("the server stopped before it started")
                await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await asyncio.gather(task, return_exceptions=True)


@dataclass
class Browser:
    """The page under test, where the app runs, and what the browser reported as errors."""

    url: str
    page: Page
    errors: list[str]

    async def open(self) -> None:
        """Load the dashboard and wait until its live feed is connected."""
        await self.page.goto(self.url + "/")
        await expect(self.page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(self.page.locator("#connection")).to_contain_text("live")


@contextlib.asynccontextmanager
async def browsing(settings: Settings) -> AsyncIterator[Browser]:
    async with serving(dashboard_app(settings)) as url, async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            context = await chromium.new_context(viewport={"width": 1366, "height": 768}, color_scheme="light")
            context.set_default_timeout(15_000)
            page = await context.new_page()
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(f"{error.name}: {error.message}"))
            yield Browser(url, page, errors)
        finally:
            await chromium.close()  # first: the page's event stream ends, so the server stops at once


@pytest.fixture
async def browser(settings: Settings) -> AsyncIterator[Browser]:
    async with browsing(settings) as instance:
        yield instance


def twin(settings: Settings, agent_id: str, role: str, department: str, *capabilities: str) -> TwinAgent:
    name = agent_id.removeprefix("agent.")
    return TwinAgent(create_agent_config(agent_id, name, role, department, list(capabilities)), settings=settings)


# -- loading ---------------------------------------------------------------------------------------


async def test_page_loads_live_with_no_console_errors(browser: Browser) -> None:
    page = browser.page
    await browser.open()
    await expect(page.get_by_role("heading", level=1)).to_contain_text("agentcomms")
    for name in (
        "Agents",
        "Conversations",
        "Live message flow",
        "Ask an agent",
        "Department status",
        "Dead letters",
        "Knowledge search",
    ):
        await expect(page.get_by_role("region", name=name, exact=True)).to_be_visible()
    await expect(page.get_by_role("banner")).to_be_visible()
    await expect(page.get_by_role("main")).to_be_visible()
    await expect(page.locator("#agents-empty")).to_be_visible()
    await expect(page.locator("#deadletters-summary")).to_have_text("none")
    await expect(page.locator("#server-info")).to_contain_text(f"v{agentcomms.__version__}")

    # every control has an accessible name, and the keyboard reaches the skip link first
    unnamed = await page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
             .filter((e) => !e.labels?.length && !e.getAttribute('aria-label') && !e.textContent.trim())
             .map((e) => e.outerHTML)"""
    )
    assert unnamed == []
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to the dashboard")).to_be_focused()
    assert browser.errors == []


# -- agents and the message flow -------------------------------------------------------------------


async def test_an_agent_started_after_the_page_loaded_appears_and_its_messages_flow(
    browser: Browser, settings: Settings
) -> None:
    page = browser.page
    await browser.open()
    await expect(page.locator("#agents-empty")).to_be_visible()

    async with TwinAgent(
        create_agent_config("agent.sarah", "sarah", "content_agent", "marketing", ["content_creation"]),
        settings=settings,
    ):
        row = page.locator('#agents-table tr[data-agent-id="agent.sarah"]')
        await expect(row).to_contain_text("content_agent")
        await expect(row).to_contain_text("marketing")
        await expect(row.locator(".status")).to_have_text("online")
        await expect(row).to_contain_text("content_creation")
        await expect(row).to_contain_text("request_knowledge")
        await expect(page.locator("#agents-summary")).to_have_text("1 registered, 1 online")

        async with httpx.AsyncClient(base_url=browser.url) as client:
            sent = await client.post(
                "/api/send", json={"recipient_id": "agent.sarah", "intent": "share_insights", "data": {"n": 1}}
            )
            assert sent.status_code == 200, sent.text
        flow = page.locator("#flow-table tbody tr")
        await expect(flow.filter(has_text="sent")).to_have_count(1)
        await expect(flow.filter(has_text="handled")).to_have_count(1)
        await expect(flow.first).to_contain_text("dashboard → agent.sarah")
        await expect(flow.first).to_contain_text("share_insights")

        # the filters narrow the flow: by intent text, by department (from the agents list), by kind
        filters = page.get_by_role("search", name="Filter the message flow")
        await filters.get_by_label("Intent").fill("request_")
        await expect(flow).to_have_count(0)
        await expect(page.locator("#flow-empty")).to_have_text("No message matches the filters.")
        await filters.get_by_label("Intent").fill("")
        await filters.get_by_label("Department").select_option("marketing")
        await expect(flow).to_have_count(2)
        await filters.get_by_label("Kind").select_option("handled")
        await expect(flow).to_have_count(1)
        await filters.get_by_label("Agent").select_option("agent.sarah")
        await expect(flow).to_have_count(1)
    # the agent left: the page shows it offline at the next refresh
    await expect(page.locator('#agents-table tr[data-agent-id="agent.sarah"] .status')).to_have_text("offline")
    assert browser.errors == []


# -- asking ------------------------------------------------------------------------------------------


async def test_a_question_asked_on_the_page_gets_its_answer_shown(browser: Browser, settings: Settings) -> None:
    page = browser.page
    agents = [
        twin(settings, "agent.cso", "cso", "sales", "pipeline", "forecasting"),
        twin(settings, "agent.cmo", "cmo", "marketing", "campaigns", "brand"),
        twin(settings, "agent.cto", "cto", "engineering", "roadmap"),
        twin(settings, "agent.content", "content_agent", "marketing", "content_creation"),
    ]
    async with contextlib.AsyncExitStack() as stack:
        for agent in agents:
            await stack.enter_async_context(agent)
        await browser.open()
        await expect(page.locator("#agents-table tbody tr")).to_have_count(4)

        form = page.get_by_role("region", name="Ask an agent")
        await form.get_by_label("You are (role)").fill("ceo")
        await form.get_by_role("combobox", name="Ask", exact=True).select_option("agent:agent.cso")
        await form.get_by_label("Question").fill("What is the Q4 forecast?")
        await form.get_by_role("button", name="Ask", exact=True).click()
        await expect(page.locator("#ask-status")).to_contain_text("Answered by agent.cso")
        answer = page.locator("#ask-answer")
        await expect(answer).to_contain_text('"q4_forecast": "$3.1M (82% confidence)"')
        await expect(answer).to_contain_text('"query": "What is the Q4 forecast?"')

        await expect(page.locator("#flow-table tbody tr").filter(has_text="dashboard → agent.cso")).to_have_count(2)

        # an intent the agent does not handle: its error is shown
        await form.get_by_label("Intent").fill("review_budget")
        await form.get_by_role("button", name="Ask", exact=True).click()
        await expect(page.locator("#ask-status")).to_contain_text("answered with an error: unsupported_intent")
        await expect(answer).to_contain_text('"success": false')

        # department status: every online member is asked at once
        status = page.get_by_role("region", name="Department status")
        await status.get_by_label("Department").select_option("marketing")
        await status.get_by_role("button", name="Ask for status").click()
        await expect(page.locator("#department-status")).to_have_text("2 of 2 answered.")
        rows = page.locator("#department-table tbody tr")
        await expect(rows).to_have_count(2)
        await expect(rows.filter(has_text="agent.cmo")).to_contain_text("answered")
        await rows.filter(has_text="agent.cmo").get_by_text("reply").click()
        await expect(rows.filter(has_text="agent.cmo")).to_contain_text('"state": "working"')

        # a role instead of an agent: any online agent of it answers
        await form.get_by_label("Intent").fill("request_knowledge")
        await form.get_by_role("combobox", name="Ask", exact=True).select_option("role:cmo")
        await form.get_by_label("Question").fill("Which campaigns are running?")
        await form.get_by_role("button", name="Ask", exact=True).click()
        await expect(page.locator("#ask-status")).to_contain_text("Answered by agent.cmo")
        await expect(answer).to_contain_text("Q4 Holiday Campaign")

        IMAGES.mkdir(parents=True, exist_ok=True)
        await page.evaluate("window.scrollTo(0, 0)")
        await page.screenshot(path=IMAGES / "dashboard.png")  # a 1366x768 laptop screen
        await page.locator("#ask-panel").screenshot(path=IMAGES / "dashboard-ask.png")
    assert browser.errors == []


# -- conversations -----------------------------------------------------------------------------------


async def test_a_conversation_timeline_shows_every_hop(browser: Browser, settings: Settings) -> None:
    page = browser.page
    async with strategist(settings), engineer(settings):
        await browser.open()
        await expect(page.locator("#agents-table tbody tr")).to_have_count(2)
        await expect(page.locator("#conversations-empty")).to_be_visible()
        form = page.get_by_role("region", name="Ask an agent")
        await form.get_by_role("combobox", name="Ask", exact=True).select_option("agent:agent.cso")
        await form.get_by_label("Intent").fill("request_strategy")
        await form.get_by_label("Question").fill("Can we ship SSO this quarter?")
        await form.get_by_role("button", name="Ask", exact=True).click()
        await expect(page.locator("#ask-status")).to_contain_text("Answered by agent.cso")
        await expect(page.locator("#ask-answer")).to_contain_text('"weeks": 3')

        # the answer links to its conversation: every hop across agents, in order, with where the time went
        await page.locator("#ask-conversation").click()
        panel = page.get_by_role("region", name="Conversations")
        await expect(panel.get_by_role("heading", name="Timeline of ")).to_be_focused()
        conversation = (await page.locator("#conversation-id").input_value()).strip()
        assert id_time_ms(conversation) is not None  # a version 7 UUID, as the library makes
        hops = page.locator("#timeline-list > li")
        await expect(hops).to_have_count(2)
        await expect(hops.nth(0)).to_contain_text("dashboard → agent.cso")
        await expect(hops.nth(0)).to_contain_text("request_strategy")
        await expect(hops.nth(1)).to_contain_text("agent.cso → agent.cto")
        await expect(hops.nth(1)).to_contain_text("estimate")
        for n in range(2):
            await expect(hops.nth(n).locator(".kind")).to_have_text("replied")
            await expect(hops.nth(n)).to_contain_text("waited")
            await expect(hops.nth(n).get_by_role("img")).to_have_attribute("aria-label", re.compile("handled in"))
        await expect(page.locator("#timeline-summary")).to_contain_text("2 messages between 3 agents")
        await hops.nth(1).get_by_text("message and reply").click()
        await expect(hops.nth(1)).to_contain_text('"weeks": 3')

        # and the list of recorded conversations has it, live
        row = page.locator("#conversations-table tbody tr").filter(has_text="request_strategy")
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text("agent.cto")
        await expect(row.locator("td.number")).to_have_text("2")
        await panel.scroll_into_view_if_needed()
        await panel.screenshot(path=IMAGES / "dashboard-conversation.png")

        assert browser.errors == []
        # an id that is not in the record says so (the browser logs the API's 404 itself: the only error)
        await panel.get_by_label("Conversation id").fill("no-such-conversation")
        await panel.get_by_role("button", name="Show timeline").click()
        await expect(page.locator("#conversations-status")).to_contain_text("Nothing of no-such-conversation")
        assert [error for error in browser.errors if "404 (Not Found)" not in error] == []


# -- dead letters ------------------------------------------------------------------------------------


async def test_a_dead_letter_is_listed_inspected_redriven_and_purged(browser: Browser, settings: Settings) -> None:
    page = browser.page
    await browser.open()
    config = create_agent_config("agent.picky", "pat", "controller", "finance")
    async with Picky(config, settings=settings.model_copy(update={"max_deliveries": 1})) as picky:
        async with httpx.AsyncClient(base_url=browser.url) as client:
            sent = await client.post("/api/send", json={"recipient_id": "agent.picky", "intent": "review_budget"})
            assert sent.status_code == 200, sent.text
        message_id = sent.json()["message_id"]

        # the feed's dead_lettered event brings it to the panel
        chip = page.get_by_role("button", name="agent.picky 1")
        await expect(chip).to_be_visible()
        await expect(page.locator("#flow-table tbody tr").filter(has_text="dead_lettered")).to_have_count(1)
        await chip.click()
        await expect(chip).to_have_attribute("aria-pressed", "true")
        row = page.locator("#deadletter-table tbody")  # one per dead letter: its row and its reason
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text("the budget spreadsheet is locked")
        await expect(row).to_contain_text("review_budget")
        await expect(row).to_contain_text("dashboard")
        entry_id = await row.get_attribute("data-entry-id")
        assert entry_id

        await page.get_by_role("button", name=f"Inspect {entry_id}").click()
        inspected = page.locator("#deadletter-json")
        await expect(inspected).to_be_focused()
        await expect(inspected).to_contain_text(f'"message_id": "{message_id}"')

        picky.broken = False
        await page.get_by_role("button", name=f"Redrive {entry_id}").click()
        await expect(page.locator("#deadletters-status")).to_contain_text(f"Redriven {entry_id}")
        async with asyncio.timeout(15):
            reviewed = await picky.reviewed.get()
        assert reviewed.message_id == message_id
        await expect(row).to_have_count(0)
        await expect(page.locator("#deadletter-agents li")).to_have_count(0)

        # purge, only after the dialog is confirmed
        picky.broken = True
        async with httpx.AsyncClient(base_url=browser.url) as client:
            for n in range(2):
                sent = await client.post(
                    "/api/send", json={"recipient_id": "agent.picky", "intent": "review_budget", "data": {"n": n}}
                )
                assert sent.status_code == 200, sent.text
        await expect(row).to_have_count(2)
        await page.get_by_role("button", name="Purge all…").click()
        dialog = page.get_by_role("dialog", name="Purge dead letters?")
        await expect(dialog).to_be_visible()
        await expect(dialog).to_contain_text("agent.picky (2 listed)")
        await dialog.get_by_role("button", name="Cancel").click()
        await expect(dialog).to_be_hidden()
        await expect(row).to_have_count(2)
        await page.get_by_role("button", name="Purge all…").click()
        await dialog.get_by_role("button", name="Purge", exact=True).click()
        await expect(page.locator("#deadletters-status")).to_have_text("Purged 2 dead letters of agent.picky.")
        await expect(row).to_have_count(0)
        await expect(page.locator("#deadletters-summary")).to_have_text("none")
    assert browser.errors == []


# -- the token -------------------------------------------------------------------------------------


async def test_the_page_asks_for_the_token_once_and_then_works(settings: Settings) -> None:
    async with browsing(settings.model_copy(update={"dashboard_token": SecretStr(TOKEN)})) as browser:
        page = browser.page
        await page.goto(browser.url + "/")
        dialog = page.get_by_role("dialog", name="Dashboard token")
        await expect(dialog).to_be_visible()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "token")
        await dialog.get_by_label("Token").fill("wrong")
        await dialog.get_by_label("Token").press("Enter")
        await expect(dialog.get_by_role("alert")).to_contain_text("not accepted")
        await dialog.get_by_label("Token").fill(TOKEN)
        await dialog.get_by_role("button", name="Continue").click()
        await expect(dialog).to_be_hidden()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(page.locator("#agents-summary")).to_have_text("0 registered, 0 online")
        assert await page.evaluate("sessionStorage.getItem('agentcomms.dashboard.token')") == TOKEN
        await page.reload()  # kept for the tab: not asked again
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(dialog).to_be_hidden()
