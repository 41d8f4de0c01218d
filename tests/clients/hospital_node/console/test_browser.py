"""The console in a real browser (Debian's Chromium driven by Playwright), served by `medfed node console`
as its own process: log in, see the pending request, approve it with a cap, see the budget chart change
after a trained round, revoke, verify the audit log. Screenshots of each page go to tests/artifacts/console/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.hospital_node.home import NodeHome
from medfed.cluster import free_port

from .conftest import SPEC, ask

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[3] / "artifacts" / "console"
REPO = Path(__file__).resolve().parents[4]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium): apt-get install chromium"),
]


OFFICER, PASSWORD = "erin", "a passphrase typed twice"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture
def console_url(home: NodeHome) -> Iterator[str]:
    """An officer account made by `medfed node console init`, then `medfed node console --home H` as a real
    process on a free loopback port, ready when /login answers."""
    made = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "node", "console", "init", "--home", str(home.path), "--officer", OFFICER],
        input=f"{PASSWORD}\n{PASSWORD}\n", capture_output=True, text=True, env=_env(), timeout=60, check=False,
    )
    assert made.returncode == 0, made.stderr
    port = free_port()
    env = _env()
    process = subprocess.Popen(
        [sys.executable, "-m", "medfed.cli", "node", "console", "--home", str(home.path), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the console exited with {process.returncode}: {process.stdout.read().decode()}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"{url}/login", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the console did not answer /login within 60 s")
            time.sleep(0.1)  # polling interval of the readiness check, not a synchronisation
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_an_officer_approves_watches_the_budget_and_revokes_in_a_browser(home: NodeHome, console_url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    digest = SPEC.digest()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900}, java_script_enabled=False)

            def shot(name: str) -> None:
                page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

            # Log in (the browser runs no script: every page is plain HTML forms).
            page.goto(f"{console_url}/requests")
            expect(page).to_have_url(f"{console_url}/login?next=%2Frequests")
            page.fill("input[name=officer]", OFFICER)
            page.fill("input[name=password]", PASSWORD)
            shot("01-login")
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{console_url}/requests")

            # The pending request, with its cost and the budget after it.
            pending = page.locator("#pending tbody tr")
            expect(pending).to_have_count(1)
            expect(pending).to_contain_text("htn-onset-logistic")
            expect(pending).to_contain_text("test_partner")
            shot("02-requests")
            page.click("text=review and decide")
            expect(page.locator("#status")).to_have_text("pending")
            expect(page.locator("#facts")).to_contain_text("cost of this experiment")
            expect(page.locator("#spec")).to_contain_text("DP-SGD noise multiplier")
            shot("03-request")

            # Approve with a cap: review, then confirm.
            page.fill("#approve-form input[name=max_epsilon]", "5")
            page.click("#approve-form button")
            expect(page.locator("#summary")).to_contain_text("ε cap")
            shot("04-confirm")
            page.click("#confirm-form button")
            expect(page.locator("#done")).to_have_text(f"Approved by {OFFICER}, and written to the signed audit log.")
            expect(page.locator("#status")).to_have_text("approved")

            # The budget before and after a trained round (charged by the node's own round handling).
            page.goto(f"{console_url}/budgets/htn_cohort")
            expect(page.locator("#charge-count")).to_have_text("0")
            assert page.locator("svg.chart circle").count() == 0
            reply = ask(home, "train")
            assert not reply.has_error()
            page.reload()
            charges = int(page.locator("#charge-count").inner_text())
            assert charges >= 1
            assert page.locator("svg.chart circle").count() == charges
            tips = page.locator("svg.chart circle title").all_text_contents()
            # Each point names its spec, run and round: the round's DP-SGD update (round 1) and the run's
            # once-per-run noisy training-set size (charged at round 0).
            named = sorted(re.match(r"charge \d+: spec (\w+), run (\w+), round (\d+)", tip).groups() for tip in tips)  # type: ignore[union-attr]
            assert named == [(digest[:12], "41", "0"), (digest[:12], "41", "1")]
            spent = float(page.locator("#spent").inner_text().removeprefix("ε "))
            assert 0 < spent < 5
            shot("05-budget")

            # Revoke: review, then confirm.
            page.goto(f"{console_url}/requests/{digest}/htn_cohort")
            page.fill("#revoke-form input[name=reason]", "consent for this use was withdrawn")
            page.click("#revoke-form button")
            page.click("#confirm-form button")
            expect(page.locator("#status")).to_have_text("revoked")
            expect(page.locator("#approve-form")).to_have_count(0)

            # The audit trail verifies and names the officer of each decision.
            page.goto(f"{console_url}/audit")
            expect(page.locator("#verification")).to_contain_text("Verified:")
            head = page.locator("#head").inner_text()
            assert head == home.audit_log().entries()[-1].hash
            page.select_option("select[name=kind]", "approval")
            page.click("form.filters button")
            rows = page.locator("#entries tbody tr")
            expect(rows).to_have_count(1)
            expect(rows).to_contain_text(f"by = {OFFICER}")
            expect(rows).to_contain_text("max_epsilon = 5.0")
            page.goto(f"{console_url}/audit")
            shot("06-audit")
            page.goto(f"{console_url}/egress")
            expect(page.locator("#egress")).to_contain_text("train")
            shot("07-egress")
            page.goto(f"{console_url}/")
            expect(page.locator("#checks")).to_contain_text("audit log")
            shot("08-health")

            # The evidence pack downloads as a zip.
            with page.expect_download() as download:
                page.click("text=Evidence pack (download)")
            assert download.value.suggested_filename.startswith("evidence-hospital_5-")
        finally:
            browser.close()
    kinds = [e.kind for e in home.audit_log().entries()]
    assert kinds.count("approval") == 1 and kinds.count("revocation") == 1
