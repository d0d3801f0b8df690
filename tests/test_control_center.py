"""The control center in a real browser: headless Chromium (Debian's, driven by
Playwright) against the gateway process on loopback with the real bus behind it. It
submits a plan through the form, watches the plan's graph reach completed, approves a
held task as a second user, wipes and restores an agent's memory, verifies the chain, and
saves a screenshot of every page (``test-artifacts/control-center/``, or
``$LEDGERBUS_ARTIFACTS``)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from nats.aio.client import Client

from ledgerbus.bus import tokens
from ledgerbus.bus.settings import Settings
from tests.support import Procs
from tests.test_e2e import projected, start_system
from tests.test_web import POLICY, _free_port, wait_until_healthy

CHROMIUM = os.environ.get("LEDGERBUS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("LEDGERBUS_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")) / "control-center"
# As root in a container, with no network: no sandbox, and none of Chromium's own calls home.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

PLAN = """name: release notes
steps:
  - id: gather
    skill: echo
    input: {text: collect merged changes}
  - id: draft
    skill: echo
    input: {text: draft}
    deps: [gather]
  - id: check
    skill: echo
    input: {text: spell-check}
    deps: [gather]
  - id: publish
    skill: echo
    input: {text: publish}
    deps: [draft, check]
"""

pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("LEDGERBUS_REQUIRE_BROWSER"),
                                reason="no Chromium (apt-get install chromium; .ci/run installs it)")


async def test_the_control_center_runs_a_plan_approves_and_restores_in_a_browser(
    procs: Procs, admin: Client, settings: Settings
) -> None:
    from playwright.async_api import Page, async_playwright, expect

    assert CHROMIUM, "LEDGERBUS_REQUIRE_BROWSER is set, and there is no Chromium (apt-get install chromium)"
    settings.policy_path.write_text(POLICY)  # sleep is held for cli-ops's approval
    await start_system(procs, admin, ("echo-1", "echo"), ("sleeper-1", "sleep"))
    tester = tokens.issue(settings.auth_dir, "cli-tester")
    ops = tokens.issue(settings.auth_dir, "cli-ops")
    port = _free_port()
    await procs.start("web", "web", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    await wait_until_healthy(base)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []

    async def shot(page: Page, name: str, full: bool = False) -> None:
        """The page as it is, without the toasts of what the test just did (docs/web.md's
        screenshots are these: `cp test-artifacts/control-center/*.png docs/img/web/`)."""
        await page.evaluate("document.getElementById('toasts').replaceChildren()")
        await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = await browser.new_page(viewport={"width": 1360, "height": 860})
        page.set_default_timeout(20_000)
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        # Any other console error (a script or style the page's policy blocked, say), but the
        # browser's own line for each refused request: the test makes some on purpose.
        page.on("console", lambda msg: msg.type == "error" and "Failed to load resource" not in msg.text
                and problems.append(f"console: {msg.text}"))

        # Signed out: the page asks for a token; a wrong one is refused and said so.
        response = await page.goto(f"{base}/#/tasks")
        assert response is not None and "script-src 'self'" in response.headers["content-security-policy"]
        await page.get_by_label("token").fill("lbt_wrong_wrong")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator(".error-box")).to_contain_text("not valid")
        await shot(page, "sign-in")
        await page.get_by_label("token").fill(tester)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator("#who")).to_have_text("cli-tester")

        # A plan through the form: checked (its graph previewed), submitted, watched to the end.
        await page.goto(f"{base}/#/submit?mode=plan")
        await page.locator("#plan-text").fill(PLAN)
        await page.get_by_role("button", name="Check").click()
        await expect(page.locator(".dag .node")).to_have_count(4)
        await shot(page, "submit-plan")
        await page.get_by_role("button", name="Submit plan").click()
        await expect(page).to_have_url(re.compile("#/task/"))
        plan_id = page.url.rsplit("/", 1)[1]
        for step in ("gather", "draft", "check", "publish"):
            await expect(page.locator(f'.dag .node[data-step="{step}"]')).to_have_attribute("data-status", "completed")
        await expect(page.locator(".page-head .badge")).to_have_text("completed")
        # Its trace waterfall, across the processes: the gateway, the router, the agent, the projector.
        for hop in ("web.submit", "router.process", "agent.run", "projector.apply"):
            await expect(page.locator(".wf-row", has_text=hop).first).to_be_visible()
        await shot(page, "task", full=True)
        assert (await projected(admin, plan_id))["submitted_by"] == "cli-tester"

        # A task nobody knows: the page says so, in place of the task.
        await page.goto(f"{base}/#/task/no-such-task")
        await expect(page.locator(".error-box")).to_contain_text("not_found")

        # A task of a held skill, through the form made from its input schema.
        await page.goto(f"{base}/#/submit?skill=sleep")
        await page.locator('input[name="seconds"]').fill("0")
        await shot(page, "submit-task")
        await page.get_by_role("button", name="Submit task").click()
        await expect(page.locator(".page-head .badge")).to_have_text("awaiting approval")
        held_id = page.url.rsplit("/", 1)[1]

        # The tasks list, live, with its filters.
        await page.goto(f"{base}/#/tasks")
        await expect(page.locator(f'a[title="{held_id}"]')).to_be_visible()
        await expect(page.locator(f'a[title="{plan_id}"]')).to_be_visible()
        await shot(page, "tasks")

        # Its submitter may not approve it: the router refuses, the page says why.
        await page.goto(f"{base}/#/approvals")
        row = page.locator(f'tr[data-task="{held_id}"]')
        await row.get_by_role("button", name="Approve").click()
        await page.locator("#confirm-ok").click()
        await expect(page.locator(".toast.bad")).to_contain_text("not_an_approver")

        # The approver signs in and approves it; it runs.
        await page.get_by_role("button", name="Sign out").click()
        await page.get_by_label("token").fill(ops)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator("#who")).to_have_text("cli-ops")
        await page.goto(f"{base}/#/approvals")
        await expect(page.locator("#approvals-count")).to_have_text("1")
        await shot(page, "approvals")
        await row.get_by_role("button", name="Approve").click()
        await page.locator("#confirm-reason").fill("looks safe")
        await page.locator("#confirm-ok").click()
        await expect(page.locator(".toast").last).to_contain_text("approved")
        await expect(row).to_have_count(0)
        done = await projected(admin, held_id)
        assert done["agent"] == "sleeper-1"

        # Agents, and one agent's memory: checkpoint, wipe, restore, each behind a confirmation.
        await page.goto(f"{base}/#/agents")
        await expect(page.locator("tbody tr")).to_have_count(2)
        await expect(page.get_by_role("link", name="echo-1")).to_be_visible()
        await shot(page, "agents")
        await page.goto(f"{base}/#/agent/echo-1")
        await page.get_by_role("button", name="Save checkpoint").click()
        await page.locator("#confirm-reason").fill("before the wipe")
        await page.locator("#confirm-ok").click()
        await expect(page.get_by_role("cell", name="before the wipe")).to_be_visible()
        await page.get_by_role("button", name="Wipe memory").click()
        await expect(page.locator("#confirm")).to_contain_text("Wipe the memory of echo-1?")
        await page.locator("#confirm-ok").click()
        await expect(page.locator(".toast").last).to_contain_text("wiped")
        await page.get_by_role("button", name="Restore").click()
        await page.locator("#confirm-ok").click()
        await expect(page.locator(".toast").last).to_contain_text("restored")
        await expect(page.get_by_role("cell", name="1×")).to_be_visible()
        await shot(page, "agent")

        # The audit log, filtered, and the chain verified from the browser.
        await page.goto(f"{base}/#/audit?key={held_id}")
        await expect(page.get_by_role("cell", name="task_approved").first).to_be_visible()
        await page.get_by_role("button", name="Verify the chain").click()
        await expect(page.locator(".panel h2 .badge")).to_have_text("ok", timeout=60_000)
        await shot(page, "audit", full=True)
        await browser.close()

    assert not problems, problems
