"""The real page in headless Chromium against chatui served by daphne and the demo upstream.

Screenshots go to test-artifacts/ (git-ignored). Nothing here sleeps: every wait is on
a selector or a condition in the page. Every page a test opens is watched for
Content-Security-Policy violations.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest

from chatui.demo.agents import AGENTS, GROUPS
from tests.live_server import LIVE_PASSWORD, LIVE_USERNAME

playwright_sync = pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.browser, pytest.mark.timeout(60)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
ECHO = next(agent for agent in AGENTS if agent.name == "Demo · Echo")
SAGE = next(agent for agent in AGENTS if agent.name == "Demo · Sage")
OPS = next(agent for agent in AGENTS if agent.name == "Demo · Ops")
DUO = GROUPS[0]
RESTART = '/tool restart_service {"service":"web","reason":"x"}'
APPROVER = "grace"

# Installed before any page script: records anything hostile that reaches the DOM,
# even for a moment while text streams, and whether streaming was seen at all.
WATCH_DOM = r"""
window.__hostile = [];
window.__sawStreaming = false;
window.__toasts = [];
window.__csp = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__csp.push(`${event.violatedDirective} ${event.blockedURI} ${event.sample || ""}`);
});
// chatui's own images: attached ones, from a blob (composer) or /attachments/ (sent).
const ownImage = (el) =>
  el.tagName === "IMG"
  && (el.classList.contains("attachment-thumb") || el.closest(".attachment-chip"))
  && /^(blob:|https?:\/\/127\.0\.0\.1:\d+\/attachments\/\d+\/$)/.test(el.src);
const check = (node) => {
  if (node.nodeType !== 1) return;
  for (const el of [node, ...node.querySelectorAll("*")]) {
    if (el.classList.contains("is-streaming")) window.__sawStreaming = true;
    if (el.classList.contains("toast")) window.__toasts.push(el.textContent);
    const tag = el.tagName;
    const ours = (tag === "SCRIPT" && (el.src || el.type === "application/json")) || ownImage(el);
    if (["SCRIPT", "IMG", "IFRAME", "OBJECT", "EMBED"].includes(tag) && !ours) {
      window.__hostile.push(el.outerHTML.slice(0, 200));
    }
    for (const attribute of el.attributes) {
      const name = attribute.name.toLowerCase();
      const value = attribute.value.trim().toLowerCase();
      if (name.startsWith("on")) window.__hostile.push(`${tag} ${name}`);
      const url = ["href", "src", "action", "formaction"].includes(name);
      if (url && value.startsWith("javascript:")) {
        window.__hostile.push(`${tag} ${name}=${value}`);
      }
    }
  }
};
new MutationObserver((records) => {
  for (const record of records) record.addedNodes.forEach(check);
}).observe(document, { childList: true, subtree: true });
"""


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def signed_in_state(chromium, chatui_server, tmp_path_factory) -> str:
    """Sign in once through the real form; later contexts reuse the session cookie."""
    context = chromium.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.goto(f"{chatui_server.url}/")
    page.wait_for_url(re.compile(r"/login/"))
    page.fill("input[name=username]", LIVE_USERNAME)
    page.fill("input[name=password]", LIVE_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/(new|conversations/\d+)/$"))
    path = tmp_path_factory.mktemp("browser") / "state.json"
    context.storage_state(path=str(path))
    context.close()
    return str(path)


class Chat:
    """A signed-in page and the things tests do with it."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.dialogs: list[str] = []
        self.accept_dialogs = False  # confirm() answers Cancel unless a test says OK
        page.on("dialog", self._dialog)
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.console: list[str] = []
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        if self.accept_dialogs:
            dialog.accept()
        else:
            dialog.dismiss()

    @property
    def csp_violations(self) -> list[str]:
        """What Chromium refused under the Content-Security-Policy, on any page so far."""
        return [line for line in self.console if "Content Security Policy" in line]

    def start(self, agent=ECHO) -> int:
        """Open a new conversation with `agent` (or a group) from the new-chat page; return
        its id."""
        self.page.goto(f"{self.server.url}/new/")
        self.page.click(f"button[name=target_id][value='{agent.id}']")
        self.page.wait_for_url(re.compile(r"/conversations/\d+/$"))
        self.wait_connected()
        return int(self.page.url.rstrip("/").rsplit("/", 1)[1])

    def wait_connected(self) -> None:
        """Wait until the socket is open and chatui answered its sync."""
        try:
            self.page.wait_for_selector("[data-connection][data-state=synced]", state="attached")
        except playwright_sync.TimeoutError:
            raise AssertionError(self.diagnosis("the socket never synced")) from None

    def send(self, text: str) -> None:
        self.page.fill("[data-composer-text]", text)
        self.page.press("[data-composer-text]", "Enter")

    def last_turn(self):
        return self.page.locator("section.turn").last

    def wait_turn(self, status: str, turns: int | None = None) -> None:
        """Wait until the latest turn has `status` (and, if given, there are `turns` turns)."""
        try:
            self.page.wait_for_function(
                """([status, turns]) => {
                     const sections = document.querySelectorAll("section.turn[data-turn]");
                     const last = sections[sections.length - 1];
                     return last && (turns === null || sections.length === turns)
                       && last.querySelector(".turn-footer").dataset.status === status;
                   }""",
                arg=[status, turns],
                timeout=30_000,
            )
        except playwright_sync.TimeoutError:
            raise AssertionError(self.diagnosis(f"no {status} turn")) from None

    def diagnosis(self, what: str) -> str:
        """What the page shows, what the server would render now, and the server's log."""
        shown = (
            self.page.locator("section.turn").last.inner_html()
            if self.page.locator("section.turn").count()
            else "(no turn)"
        )
        fresh = self.page.request.get(self.page.url).text()
        statuses = re.findall(r'turn-footer" data-turn="(\d+)" data-status="(\w+)"', fresh)
        state = self.page.evaluate(
            """() => ({
                 connection: document.querySelector("[data-connection]").dataset.state,
                 toasts: window.__toasts,
                 pending: [...document.querySelectorAll(".is-pending")].map((el) => el.textContent),
                 composer: document.querySelector("[data-composer-text]").value,
               })"""
        )
        return (
            f"{what}\n--- page state {state}, console {self.console}\n--- page shows:\n{shown}\n"
            f"--- server renders turns {statuses}\n--- server log:\n{self.server.log_tail(60)}"
        )

    def sign_in(self, username: str, password: str = LIVE_PASSWORD) -> None:
        self.page.goto(f"{self.server.url}/login/")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", password)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(re.compile(r"/(new|conversations/\d+)/$"))

    def waiting_form(self):
        """The newest decision form in the transcript, once it is there."""
        form = self.page.locator("form[data-decide]").last
        form.wait_for()
        return form

    def wait_approval(self, state: str):
        """Wait until the newest approval shows `state` (its record, or its form)."""
        approval = self.page.locator(f"[data-approval][data-state={state}]").last
        approval.wait_for()
        return approval

    def wait_streamed(self, text: str) -> None:
        """Wait until streaming (not yet stored) assistant text contains `text`."""
        self.page.wait_for_function(
            """(text) => [...document.querySelectorAll('.msg-assistant.is-streaming .md')]
                 .some((el) => el.textContent.includes(text))""",
            arg=text,
        )

    def assistant_texts(self) -> list[str]:
        return self.last_turn().locator(".msg-assistant .md").all_inner_texts()

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        # Finished animations: a message caught mid fade-in would look washed out.
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), animations="disabled")


@pytest.fixture
def open_chat(chromium, chatui_server, signed_in_state, demo):
    """Pages signed in as ada (or as `username`, signing in through the form)."""
    contexts, chats = [], []

    def make(viewport=DESKTOP, color_scheme="light", username=None) -> Chat:
        state = None if username else signed_in_state
        context = chromium.new_context(
            viewport=viewport, color_scheme=color_scheme, storage_state=state
        )
        context.add_init_script(WATCH_DOM)
        contexts.append(context)
        chat = Chat(context.new_page(), chatui_server)
        if username:
            chat.sign_in(username)
        chats.append(chat)
        return chat

    yield make
    for context in contexts:
        context.close()
    assert [line for chat in chats for line in chat.csp_violations] == []
    # No test expects the page's script to throw: an uncaught error is a broken page.
    assert [error for chat in chats for error in chat.errors] == []


@pytest.fixture
def chat(open_chat) -> Chat:
    chat = open_chat()
    yield chat
    assert chat.errors == [], f"script errors on the page: {chat.errors}"


def tokens(n: int) -> str:
    return " ".join(f"t{i}" for i in range(1, n + 1))


def test_it_chats_with_a_demo_agent(chat):
    chat.start(ECHO)
    chat.send("hello there")
    chat.wait_turn("completed")
    assert chat.last_turn().locator(".msg-user .bubble").inner_text() == "hello there"
    assert chat.assistant_texts() == ["Echo: hello there"]
    assert chat.page.locator(".msg-user").count() == 1  # the "Sending…" bubble was replaced
    announced = chat.page.locator("[data-announcer]")
    assert announced.get_attribute("aria-live") == "polite"
    assert announced.inner_text() == "Demo · Echo replied: Echo: hello there"
    footer = chat.last_turn().locator(".turn-footer")
    assert "Completed" in footer.inner_text()
    assert chat.page.locator("[data-conversation-title]").inner_text() == "hello there"
    assert chat.page.locator(".conversation-link.is-current .conversation-title").inner_text() == (
        "hello there"
    )
    chat.screenshot("chat-echo-desktop-light")


def test_tokens_arrive_before_the_reply_is_complete(chat, demo):
    demo.config(token_delay=0.04)
    chat.start(ECHO)
    chat.send("/tokens 40")
    seen = []
    for marker in ("t3", "t12", "t24"):
        chat.wait_streamed(marker)
        seen.append(chat.page.locator(".msg-assistant.is-streaming .md").inner_text())
        assert chat.last_turn().locator(".turn-footer").get_attribute("data-status") == "running"
    assert len(seen[0]) < len(seen[1]) < len(seen[2])
    assert chat.page.locator("[data-stop]").is_visible()
    chat.screenshot("streaming-desktop-light")
    chat.wait_turn("completed")
    assert chat.assistant_texts() == [tokens(40)]
    assert chat.page.locator(".msg.is-streaming").count() == 0
    assert chat.page.locator("[data-send]").is_visible()


def test_a_reload_mid_stream_shows_the_whole_answer_once(chat, demo):
    demo.config(token_delay=0.03)
    chat.start(ECHO)
    chat.send("/tokens 60")
    chat.wait_streamed("t5")
    chat.page.reload()
    chat.page.wait_for_selector("section.turn .msg-user")
    # The page keeps following the same turn after the reload, still live.
    chat.wait_streamed("t40")
    chat.wait_turn("completed")
    turn = chat.last_turn()
    assert turn.locator(".msg-user").count() == 1
    assert chat.assistant_texts() == [tokens(60)]
    assert chat.page.locator(".msg-assistant").count() == 1
    ids = chat.page.locator("[data-id]").evaluate_all("(els) => els.map((el) => el.dataset.id)")
    assert len(ids) == len(set(ids))


def test_stop_keeps_the_partial_reply_and_offers_retry(chat, demo):
    demo.config(token_delay=0.05)
    chat.start(ECHO)
    chat.send("/tokens 400")
    chat.wait_streamed("t4")
    chat.page.click("[data-stop]")
    chat.wait_turn("cancelled")
    footer = chat.last_turn().locator(".turn-footer")
    assert "Stopped" in footer.inner_text()
    retry = footer.locator("[data-retry]")
    assert retry.is_visible()
    (partial,) = chat.assistant_texts()
    assert partial.startswith("t1 t2 t3 t4") and "t400" not in partial
    assert chat.page.locator("[data-send]").is_visible()
    chat.screenshot("stopped-desktop-light")
    # Letta sends one last piece after the cancel, and chatui stores the message again
    # before the turn's last frame: the page shows what is stored.
    (live,) = chat.assistant_texts()
    chat.page.reload()
    chat.wait_connected()
    (stored,) = chat.assistant_texts()
    assert live == stored

    demo.config(token_delay=0.0)
    retry.click()
    chat.wait_turn("completed")
    assert chat.page.locator("[data-retry]").count() == 0
    assert chat.last_turn().locator(".msg-user").count() == 1


def test_agent_markup_stays_inert(chat, demo):
    demo.config(token_delay=0.004)
    chat.start(SAGE)
    chat.send('/markdown-xss /run lookup {"q": "<img src=x onerror=alert(1)>"} check this')
    chat.wait_turn("completed")
    page = chat.page
    assert page.evaluate("window.__sawStreaming"), "the reply never streamed"
    assert page.evaluate("window.__hostile") == []
    assert chat.dialogs == []
    # The markup is shown as text, and the page still works.
    answer = " ".join(chat.assistant_texts())
    assert "<script>alert(1)</script>" in answer
    assert "<img src=x onerror=alert(1)>" in page.locator(".msg-tool_call pre").first.inner_text()
    hrefs = page.locator("a[href]").evaluate_all("(els) => els.map((el) => el.href)")
    assert not [href for href in hrefs if href.lower().startswith("javascript:")]
    page.locator(".msg-assistant .md").last.hover()
    assert chat.dialogs == []
    chat.screenshot("markup-inert-desktop-light")


def test_it_follows_the_reply_only_while_the_reader_is_at_the_bottom(open_chat, demo):
    demo.config(token_delay=0.01)
    chat = open_chat(viewport=PHONE)
    chat.start(SAGE)
    chat.send("Tell me everything about compost")
    page = chat.page
    transcript = page.locator("[data-transcript-scroll]")
    gap = "(el) => el.scrollHeight - el.scrollTop - el.clientHeight"
    # Pinned: as the reply outgrows the screen, the view follows it down.
    page.wait_for_function(
        """() => { const el = document.querySelector("[data-transcript-scroll]");
                   return document.querySelector(".msg-assistant.is-streaming")
                     && el.scrollHeight > el.clientHeight + 300; }"""
    )
    assert transcript.evaluate(gap) < 48
    # Scrolled up: more text arrives, the view stays where the reader put it.
    transcript.evaluate("(el) => el.scrollBy(0, -250)")
    page.wait_for_function(
        "() => !document.querySelector('[data-jump]').hidden"
        " || !document.querySelector('.msg-assistant.is-streaming')"
    )
    held = transcript.evaluate("(el) => el.scrollTop")
    height = transcript.evaluate("(el) => el.scrollHeight")
    page.wait_for_function(
        "(h) => document.querySelector('[data-transcript-scroll]').scrollHeight > h + 40",
        arg=height,
    )
    assert transcript.evaluate("(el) => el.scrollTop") == held
    assert page.locator("[data-jump]").is_visible()
    page.click("[data-jump]")
    assert transcript.evaluate(gap) < 48
    chat.wait_turn("completed")
    assert transcript.evaluate(gap) < 48
    assert chat.errors == []


def test_enter_shift_enter_and_escape(chat, demo):
    chat.start(ECHO)
    box = chat.page.locator("[data-composer-text]")
    box.fill("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    assert chat.page.locator(".msg-user").count() == 0
    # Enter while an input method is composing must not send.
    box.evaluate(
        """(el) => el.dispatchEvent(new KeyboardEvent("keydown",
             {key: "Enter", isComposing: true, bubbles: true, cancelable: true}))"""
    )
    assert chat.page.locator(".msg-user").count() == 0
    box.press("Enter")
    chat.wait_turn("completed")
    assert chat.last_turn().locator(".msg-user .bubble").inner_text() == "line one\nline two"
    assert box.input_value() == ""

    demo.config(token_delay=0.05)
    chat.send("/tokens 400")
    chat.wait_streamed("t3")
    chat.page.keyboard.press("Escape")
    chat.wait_turn("cancelled")


def test_scrolling_up_loads_older_messages(chat, chatui_server):
    # Last week's history: old enough not to count against today's send rate.
    code = (
        "from datetime import timedelta\n"
        "from django.contrib.auth import get_user_model\n"
        "from django.utils import timezone\n"
        "from chatui.models import Conversation, Message, Turn\n"
        "then = timezone.now() - timedelta(days=7)\n"
        f"owner = get_user_model().objects.get(username={LIVE_USERNAME!r})\n"
        f"c = Conversation.objects.create(owner=owner, target_id={ECHO.id!r},"
        " target_name='Demo · Echo', title='Long history', created_at=then, updated_at=then)\n"
        "turns = Turn.objects.bulk_create(Turn(conversation=c, otid=f'old-{n:04d}',"
        " status='completed', created_at=then) for n in range(65))\n"
        "Message.objects.bulk_create(Message(conversation=c, turn=t, kind=k, created_at=then,"
        " text=f'{k} number {n}') for n, t in enumerate(turns) for k in ('user', 'assistant'))\n"
        "print(c.pk)\n"
    )
    conversation = chatui_server.manage("shell", "-v", "0", "-c", code).stdout.split()[-1]
    page = chat.page
    response = page.goto(f"{chatui_server.url}/conversations/{conversation}/")
    assert response.status == 200, (conversation, response.status)
    chat.wait_connected()
    assert page.locator(".msg").count() == 50
    for expected in (100, 130):
        page.locator("[data-transcript-scroll]").evaluate("(el) => { el.scrollTop = 0; }")
        page.wait_for_function(
            "(n) => document.querySelectorAll('.msg').length === n", arg=expected
        )
    assert page.locator("[data-load-older]").count() == 0
    texts = page.locator(".msg .bubble, .msg .md").all_inner_texts()
    kinds = ("user", "assistant")
    assert texts == [f"{kinds[i % 2]} number {i // 2}" for i in range(130)]
    # Turns split across two pages are joined back into one section each.
    assert page.locator("section.turn").count() == 65


def test_it_reconnects_after_a_server_restart_and_loses_nothing(chromium, make_chatui_server, demo):
    server = make_chatui_server()
    server.create_user(LIVE_USERNAME, LIVE_PASSWORD)
    context = chromium.new_context(viewport=DESKTOP)
    try:
        chat = Chat(context.new_page(), server)
        chat.page.goto(f"{server.url}/login/")
        chat.page.fill("input[name=username]", LIVE_USERNAME)
        chat.page.fill("input[name=password]", LIVE_PASSWORD)
        chat.page.click("button[type=submit]")
        chat.page.wait_for_url(re.compile(r"/new/$"))
        chat.start(ECHO)
        chat.send("before the restart")
        chat.wait_turn("completed")

        server.stop()
        chat.page.wait_for_selector("[data-connection][data-state=reconnecting]")
        assert chat.page.locator("[data-connection]").inner_text() == "Reconnecting…"
        # Written while the server is away: shown at once, sent once it is back.
        chat.send("while it was away")
        assert chat.page.locator(".msg-user.is-pending .bubble").inner_text() == (
            "while it was away"
        )
        server.start()
        chat.wait_turn("completed", turns=2)
        chat.wait_connected()
        users = chat.page.locator(".msg-user .bubble").all_inner_texts()
        assert users == ["before the restart", "while it was away"]
        assert chat.page.locator(".msg-assistant .md").all_inner_texts() == [
            "Echo: before the restart",
            "Echo: while it was away",
        ]
        chat.page.reload()
        chat.wait_connected()
        assert chat.page.locator(".msg").count() == 4
        assert chat.errors == []
    finally:
        context.close()


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
def test_it_is_usable_at_phone_width(open_chat, color_scheme):
    chat = open_chat(viewport=PHONE, color_scheme=color_scheme)
    chat.start(SAGE)
    page = chat.page
    sidebar = page.locator("#sidebar")
    assert not sidebar.is_visible() or sidebar.bounding_box()["x"] < -100
    chat.send("How do I start?")
    chat.wait_turn("completed")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    composer = page.locator("[data-composer]").bounding_box()
    assert composer["x"] >= 0 and composer["x"] + composer["width"] <= PHONE["width"]
    chat.screenshot(f"chat-sage-phone-{color_scheme}")

    page.click("[data-drawer-toggle]")
    page.wait_for_function(
        "() => document.getElementById('sidebar').getBoundingClientRect().left >= 0"
    )
    assert page.locator("[data-drawer-toggle]").get_attribute("aria-expanded") == "true"
    chat.screenshot(f"drawer-phone-{color_scheme}")
    page.keyboard.press("Escape")
    page.wait_for_function(
        "() => document.getElementById('sidebar').getBoundingClientRect().right <= 0"
    )
    assert chat.errors == []


def test_desktop_dark(open_chat):
    chat = open_chat(color_scheme="dark")
    chat.start(SAGE)
    chat.send("Plan a weekend trip")
    chat.wait_turn("completed")
    chat.page.locator(".msg-reasoning summary").first.click()
    chat.screenshot("chat-sage-desktop-dark")
    assert chat.errors == []


# -- approvals, questions, images, groups, settings ----------------------------------------


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A small solid-colour PNG, made here rather than kept as a file."""
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def people(chatui_server) -> None:
    """An approver (may decide anyone's tool calls), a staff user, and a user of its own
    for the screenshot tour (sends count against a per-user rate limit)."""
    chatui_server.create_user(APPROVER, LIVE_PASSWORD, permissions=("decide_approvalrequest",))
    chatui_server.create_user("root", LIVE_PASSWORD, superuser=True)
    chatui_server.create_user("tour", LIVE_PASSWORD)


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    files = {
        "indigo.png": png(48, 32, (79, 70, 229)),
        "teal.png": png(32, 32, (15, 118, 110)),
        "notes.png": b"These are my notes, not a picture.",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def ask_approval(chat: Chat, agent=OPS, text: str = RESTART):
    chat.start(agent)
    chat.send(text)
    chat.wait_turn("completed")
    return chat.waiting_form()


def test_an_approver_decides_in_the_console_and_the_chat_follows_live(
    chromium, make_chatui_server, demo
):
    # A server of its own: a turn that crashes here would keep its agent locked.
    server = make_chatui_server()
    server.create_user(LIVE_USERNAME, LIVE_PASSWORD)
    server.create_user(APPROVER, LIVE_PASSWORD, permissions=("decide_approvalrequest",))
    chats = []
    for username in (APPROVER, LIVE_USERNAME):
        context = chromium.new_context(viewport=DESKTOP)
        context.add_init_script(WATCH_DOM)
        chats.append(Chat(context.new_page(), server))
        chats[-1].sign_in(username)
    console, chat = chats
    console.page.goto(f"{server.url}/approvals/")
    assert console.page.locator("[data-pending-count]").is_hidden()  # nothing waits yet

    chat.start(OPS)
    chat.send(RESTART)
    chat.wait_turn("completed")
    approval = chat.waiting_form().get_attribute("data-decide")

    # The request arrives in the console by itself, with its context.
    card = console.page.locator(f"[data-approval-card='{approval}']")
    card.wait_for()
    assert card.locator(".tool-name").inner_text() == "restart_service"
    assert '"service": "web"' in card.locator(".tool-args").inner_text()
    assert RESTART in card.locator(".approval-context").inner_text()
    assert "ada’s conversation" in card.inner_text()
    console.page.wait_for_function(
        "() => document.querySelector('[data-pending-count]').textContent === '1'"
    )
    assert console.page.locator("[data-console-count]").inner_text() == "1 waiting for a decision"
    card.locator("input[name=reason]").fill("Go ahead, it is stuck")
    card.locator("button[value=approve]").click()
    # Decided in place, no reload and no banner: the card keeps what was decided.
    card.locator("[data-approval][data-state=approved]").wait_for()
    assert console.page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert console.page.locator(".flash").count() == 0
    assert card.locator(".tool-name").inner_text() == "restart_service"
    assert '"service": "web"' in card.locator(".tool-args").inner_text()
    done = card.locator(".approval-record").inner_text()
    assert "approved" in done.lower() and "by grace" in done
    assert "Go ahead, it is stuck" in card.inner_text()

    # ada's page shows who decided, then the tool's result and the answer, unreloaded.
    record = chat.wait_approval("approved")
    assert "by grace" in record.inner_text() and "Go ahead, it is stuck" in record.inner_text()
    chat.wait_turn("completed", turns=2)
    turn = chat.last_turn()
    assert "Restarted service 'web'" in turn.locator(".tool-result").inner_text()
    assert "Done" in " ".join(chat.assistant_texts())
    assert chat.page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert chat.errors == [] and console.errors == []
    assert chat.csp_violations == [] and console.csp_violations == []


def test_approve_and_deny_in_the_chat(open_chat):
    chat = open_chat()
    form = ask_approval(chat, ECHO)
    # Sending while the agent waits: the text comes back and the form is pointed at.
    chat.send("are you still there?")
    chat.page.wait_for_function(
        "() => document.querySelector('[data-composer-text]').value === 'are you still there?'"
    )
    card = chat.page.locator(".tool-card.is-attention")
    card.wait_for()
    assert form.evaluate("(el) => el.contains(document.activeElement)")
    assert "waiting for a decision on restart_service" in " ".join(
        chat.page.evaluate("window.__toasts")
    )
    assert chat.page.locator(".msg-user").count() == 1

    waiting = chat.page.locator('.toast[data-cause="approval_pending"]')
    assert waiting.count() == 1
    form.locator("input[name=reason]").fill("Not during the demo")
    form.locator("button[value=deny]").click()
    record = chat.wait_approval("denied")
    assert "Denied" in record.text_content() and "by ada" in record.text_content()
    # The error's cause is gone, so is the error (not 8 s later).
    waiting.wait_for(state="detached", timeout=2000)
    assert "Not during the demo" in record.inner_text()
    chat.wait_turn("completed", turns=2)
    assert chat.assistant_texts() == [
        "Tool said: Error: request to call tool denied. User reason: Not during the demo"
    ]

    chat.page.fill("[data-composer-text]", "")
    chat.send(RESTART)
    chat.wait_turn("completed", turns=3)
    chat.waiting_form().locator("button[value=approve]").click()
    chat.wait_turn("completed", turns=4)
    assert chat.assistant_texts()[0].startswith("Tool said: Restarted service 'web'")
    assert chat.page.locator("form[data-decide]").count() == 0


def test_a_decision_someone_else_made_first_is_shown_as_theirs(open_chat, chromium):
    chat = open_chat()
    ask_approval(chat, ECHO)
    # A second tab that misses the news of the decision (its socket drops that frame).
    late = open_chat()
    dropping = {"on": True}

    def drop_decisions(socket) -> None:
        server = socket.connect_to_server()
        socket.on_message(server.send)
        server.on_message(
            lambda frame: (
                None
                if dropping["on"] and '"type": "approval"' in str(frame)
                else socket.send(frame)
            )
        )

    late.page.route_web_socket(re.compile(r"/ws/conversations/"), drop_decisions)
    late.page.goto(chat.page.url)
    late.wait_connected()
    chat.waiting_form().locator("button[value=approve]").click()
    chat.wait_approval("approved")
    late.wait_turn("completed", turns=2)
    dropping["on"] = False
    late.waiting_form().locator("button[value=deny]").click()
    record = late.wait_approval("approved")
    assert "by ada" in record.inner_text()
    late.page.wait_for_function(
        "() => window.__toasts.some((t) => t.includes('already decided this (approved)'))"
    )


def test_a_question_is_answered_in_the_chat(open_chat):
    chat = open_chat()
    chat.start(ECHO)
    chat.send("/ask What is your name?")
    chat.wait_turn("completed")
    form = chat.waiting_form()
    question = chat.page.locator("[data-approval][data-kind=question]").last
    assert question.locator(".question-text").inner_text() == "What is your name?"
    assert chat.page.locator(".chip-question").first.inner_text().lower() == "question"
    form.locator("textarea[name=answer]").fill("Ada Lovelace")
    form.locator("textarea[name=answer]").press("Enter")
    record = chat.wait_approval("answered")
    assert "Answered" in record.text_content() and "Ada Lovelace" in record.text_content()
    chat.wait_turn("completed", turns=2)
    assert chat.assistant_texts() == ["Tool said: Ada Lovelace"]


def test_images_are_attached_shown_and_seen_by_the_agent(open_chat, images):
    chat = open_chat()
    chat.start(ECHO)
    page = chat.page
    # Something that only pretends to be an image is refused, and says why.
    page.set_input_files("[data-attach-input]", str(images["notes.png"]))
    page.wait_for_function(
        "() => window.__toasts.some((t) => t.includes('notes.png is not an image chatui accepts'))"
    )
    assert page.locator(".attachment-chip").count() == 0

    page.set_input_files("[data-attach-input]", [images["indigo.png"], images["teal.png"]])
    page.wait_for_function(
        "() => document.querySelectorAll('.attachment-chip').length === 2"
        " && !document.querySelector('.attachment-chip.is-uploading')"
    )
    page.locator(".attachment-chip .attachment-remove").last.click()
    assert page.locator(".attachment-chip").count() == 1
    chat.send("what is this?")
    chat.wait_turn("completed")
    thumbnail = chat.last_turn().locator(".msg-user img.attachment-thumb")
    assert thumbnail.count() == 1
    link = chat.last_turn().locator(".msg-user a.attachment-link")
    assert re.fullmatch(r"/attachments/\d+/", link.get_attribute("href"))
    page.wait_for_function(
        "() => { const img = document.querySelector('.msg-user img.attachment-thumb');"
        " return img && img.complete && img.naturalWidth === 48; }"
    )
    size = images["indigo.png"].stat().st_size
    assert chat.assistant_texts() == [f"Echo: what is this? [1 image (image/png, {size} bytes)]"]
    assert page.locator("[data-attachments]").is_hidden()

    # Images alone are a message too; pasting attaches as well.
    page.evaluate(
        """async () => {
             const sent = document.querySelector('.attachment-thumb').src;
             const blob = await (await fetch(sent)).blob();
             const data = new DataTransfer();
             data.items.add(new File([blob], "pasted.png", {type: "image/png"}));
             document.querySelector("[data-composer-text]").dispatchEvent(
               new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
           }"""
    )
    page.wait_for_function(
        "() => document.querySelectorAll('.attachment-chip').length === 1"
        " && !document.querySelector('.attachment-chip.is-uploading')"
    )
    page.press("[data-composer-text]", "Enter")
    chat.wait_turn("completed", turns=2)
    assert chat.last_turn().locator(".msg-user .bubble").count() == 0
    assert chat.assistant_texts() == [f"Echo: [1 image (image/png, {size} bytes)]"]

    # Dropped onto the conversation, an image is attached too.
    page.evaluate(
        """async () => {
             const sent = document.querySelector('.attachment-thumb').src;
             const blob = await (await fetch(sent)).blob();
             window.__drop = new DataTransfer();
             window.__drop.items.add(new File([blob], "dropped.png", {type: "image/png"}));
             document.querySelector("[data-transcript]").dispatchEvent(new DragEvent(
               "dragenter", {dataTransfer: window.__drop, bubbles: true, cancelable: true}));
           }"""
    )
    assert page.locator("[data-drop-zone]").is_visible()
    page.evaluate(
        """() => document.querySelector("[data-transcript]").dispatchEvent(new DragEvent(
             "drop", {dataTransfer: window.__drop, bubbles: true, cancelable: true}))"""
    )
    assert page.locator("[data-drop-zone]").is_hidden()
    page.locator(".attachment-chip:not(.is-uploading) img[alt='dropped.png']").wait_for()


def test_a_group_chat_names_and_colours_each_agent(open_chat, demo):
    chat = open_chat()
    chat.start(DUO)
    members = chat.page.locator(".chat-members .member").all_inner_texts()
    assert members == ["Demo · Ada", "Demo · Lin"]
    chat.send("How should we plan the garden?")
    chat.wait_turn("completed")
    answers = chat.last_turn().locator(".msg-assistant")
    assert answers.count() == 2
    names = [answers.nth(n).locator(".msg-sender").inner_text() for n in range(2)]
    assert names == ["Demo · Ada", "Demo · Lin"]
    colours = answers.evaluate_all(
        "(els) => els.map((el) => getComputedStyle(el.querySelector('.msg-sender')).color)"
    )
    assert colours[0] != colours[1]
    assert chat.assistant_texts()[0].startswith("Ada here.")

    # A server without the group stream: the page says who is working meanwhile.
    demo.config(group_stream=False)
    chat.send("/delay 1500 And then?")
    status = chat.last_turn().locator(".turn-status")
    chat.page.wait_for_function(
        "() => [...document.querySelectorAll('.turn-status')].some("
        "(el) => el.textContent === 'Demo · Ada and Demo · Lin are working…')"
    )
    chat.wait_turn("completed", turns=2)
    assert status.inner_text() == "Completed"
    assert chat.last_turn().locator(".msg-assistant .msg-sender").all_inner_texts() == [
        "Demo · Ada",
        "Demo · Lin",
    ]


def test_reply_settings_are_saved_and_used(open_chat):
    chat = open_chat()
    chat.start(ECHO)
    page = chat.page
    page.click("[data-menu] summary")
    page.click("[data-options-open]")
    dialog = page.locator("dialog[open]")
    dialog.locator("select[name=override_model]").select_option("demo/thorough")
    dialog.locator("input[name=max_steps]").fill("4")
    dialog.locator(".segmented label", has_text="Off").click()
    dialog.locator(".check", has_text="Reasoning").click()
    dialog.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r"/conversations/\d+/$"))
    assert "Reply settings saved" in page.locator(".flash").inner_text()
    # A confirmation does not stay above the header until the next reload.
    page.locator(".flash p").wait_for(state="detached", timeout=8000)
    assert (
        "Model demo/thorough, at most 4 steps, thinking off"
        in page.locator("[data-options-open] + .menu-note").text_content()
    )
    chat.wait_connected()
    chat.send("which model?")
    chat.wait_turn("completed")
    assert chat.assistant_texts() == ["Echo: which model? [model: demo/thorough]"]
    # Escape closes the dialog without touching anything.
    page.click("[data-menu] summary")
    page.click("[data-options-open]")
    dialog.wait_for()
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")


def test_feedback_on_an_answer(open_chat):
    chat = open_chat()
    chat.start(ECHO)
    chat.send("rate me")
    chat.wait_turn("completed")
    answer = chat.last_turn().locator(".msg-assistant")
    answer.hover()
    answer.locator(".feedback-down").click()
    status = answer.locator("[data-feedback-status]")
    status.filter(has_text="Marked not helpful").wait_for()
    answer.locator(".feedback-comment summary").click()
    answer.locator("input[name=comment]").fill("Too short")
    answer.locator("input[name=comment]").press("Enter")
    answer.locator(".feedback-comment summary", has_text="Edit comment").wait_for(state="attached")
    chat.page.reload()
    answer = chat.last_turn().locator(".msg-assistant")
    assert answer.locator(".feedback-down").get_attribute("aria-pressed") == "true"
    assert answer.locator(".feedback-button").first.get_attribute("aria-pressed") == "false"
    assert answer.locator("input[name=comment]").input_value() == "Too short"


def test_no_page_breaks_the_content_security_policy(open_chat, people, images):
    chat = open_chat(username="root")
    page = chat.page
    visited = []

    def visit(path: str) -> None:
        page.goto(f"{chat.server.url}{path}")
        page.wait_for_load_state("networkidle")
        visited.append((path, page.evaluate("window.__csp")))

    conversation = chat.start(ECHO)
    page.set_input_files("[data-attach-input]", str(images["indigo.png"]))
    page.wait_for_selector(".attachment-chip:not(.is-uploading)")
    chat.send("/ask Anything to add?")
    chat.wait_turn("completed")
    visited.append(("chat, live", page.evaluate("window.__csp")))
    page.click("[data-menu] summary")
    page.click("[data-options-open]")
    page.locator("dialog[open]").wait_for()
    visited.append(("reply settings", page.evaluate("window.__csp")))
    for path in (
        f"/conversations/{conversation}/",
        "/new/",
        "/approvals/",
        "/approvals/history/",
        f"/conversations/{conversation}/options/",
        "/admin/",
        "/admin/chatui/conversation/",
        f"/admin/chatui/conversation/{conversation}/change/",
        "/admin/chatui/approvalrequest/",
        "/admin/auth/user/add/",
    ):
        visit(path)
    assert [(path, found) for path, found in visited if found] == []
    assert chat.csp_violations == [] and chat.errors == []


# -- screenshots of the new parts of the page -------------------------------------------------


@pytest.mark.parametrize(
    ("size", "viewport", "color_scheme"),
    [
        ("desktop", DESKTOP, "light"),
        ("desktop", DESKTOP, "dark"),
        ("phone", PHONE, "light"),
        ("phone", PHONE, "dark"),
    ],
)
def test_screenshots_of_approvals_questions_images_groups_and_settings(
    open_chat, people, images, size, viewport, color_scheme
):
    name = f"{size}-{color_scheme}"
    chat = open_chat(viewport=viewport, color_scheme=color_scheme, username="tour")
    page = chat.page

    form = ask_approval(chat, OPS)
    form.scroll_into_view_if_needed()
    chat.screenshot(f"approval-form-{name}")

    console = open_chat(viewport=viewport, color_scheme=color_scheme, username=APPROVER)
    console.page.goto(f"{console.server.url}/approvals/")
    console.page.locator(f"[data-approval-card='{form.get_attribute('data-decide')}']").wait_for()
    console.screenshot(f"console-{name}")

    approval = form.get_attribute("data-decide")
    form.locator("input[name=reason]").fill("Wait until the backup finishes")
    form.locator("button[value=deny]").click()
    # The console, open elsewhere, shows who decided, and keeps what was decided.
    done = console.page.locator(f"[data-approval-card='{approval}'].is-decided")
    done.wait_for()
    assert "Denied" in done.text_content() and "by tour" in done.text_content()
    assert "Wait until the backup finishes" in done.text_content()
    assert done.locator(".tool-args").count() == 1
    if name == "desktop-light":
        console.screenshot(f"console-decided-{name}")
    chat.wait_turn("completed", turns=2)
    chat.page.locator(".approval-record").last.scroll_into_view_if_needed()
    chat.screenshot(f"approval-record-{name}")

    chat.start(ECHO)
    chat.send("/ask Which garden bed should I plant first?")
    chat.wait_turn("completed")
    chat.screenshot(f"question-form-{name}")
    page.set_input_files("[data-attach-input]", [images["indigo.png"], images["teal.png"]])
    page.wait_for_function("() => !document.querySelector('.attachment-chip.is-uploading')")
    chat.screenshot(f"composer-images-{name}")

    page.click("[data-menu] summary")
    page.click("[data-options-open]")
    page.locator("dialog[open]").wait_for()
    chat.screenshot(f"reply-settings-{name}")
    page.keyboard.press("Escape")

    chat.start(DUO)
    chat.send("Help me plan the garden")
    chat.wait_turn("completed")
    chat.screenshot(f"group-{name}")
    assert chat.errors == [] and console.errors == []
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]


# -- frames lost on the way ------------------------------------------------------------
# A worker under overload may drop frames (README, Scale-out). A lossy hop between the
# page and chatui (Playwright's websocket routing) checks that the page notices a gap,
# or the quiet where a turn's end should have been, and catches up without a reload.


class LossyHop:
    """Passes frames between the page and chatui, dropping those `drop` picks until the
    page asks for a second sync; counts the syncs the page sends."""

    def __init__(self, page, drop):
        self.drop = drop
        self.syncs = 0
        self.dropped: list[str] = []
        page.route_web_socket(re.compile(r"/ws/conversations/\d+/$"), self.route)

    def route(self, ws) -> None:
        server = ws.connect_to_server()
        ws.on_message(lambda message: self.to_server(server, message))
        server.on_message(lambda message: self.to_page(ws, message))

    def to_server(self, server, message: str) -> None:
        if json.loads(message).get("type") == "sync":
            self.syncs += 1
        server.send(message)

    def to_page(self, ws, message: str) -> None:
        frame = json.loads(message)
        if self.syncs < 2 and self.drop(frame):
            self.dropped.append(frame["type"])
            return
        ws.send(message)


def test_a_delta_beyond_what_the_page_has_makes_it_sync(chat, demo):
    demo.config(token_delay=0.03)
    deltas = []

    def second_delta(frame) -> bool:
        if frame["type"] == "delta":
            deltas.append(frame)
            return len(deltas) == 2
        return False

    hop = LossyHop(chat.page, second_delta)
    chat.start(ECHO)
    chat.send("/tokens 40")
    chat.wait_turn("completed")
    assert hop.dropped == ["delta"]
    assert hop.syncs == 2  # the first on connecting, the second for the gap
    assert chat.assistant_texts() == [tokens(40)]


def test_a_running_turn_gone_quiet_makes_the_page_sync_and_see_its_end(chat, demo):
    demo.config(token_delay=0.01)

    def the_answer_and_the_end(frame) -> bool:
        stored_answer = frame["type"] == "message" and frame["message"]["kind"] == "assistant"
        return stored_answer or (frame["type"] == "turn" and frame["turn"]["status"] == "completed")

    hop = LossyHop(chat.page, the_answer_and_the_end)
    chat.start(ECHO)
    chat.send("/tokens 20")
    chat.wait_turn("completed")  # only a sync can tell it: both frames were dropped
    assert sorted(hop.dropped) == ["message", "turn"]
    assert hop.syncs == 2
    assert chat.assistant_texts() == [tokens(20)]
    assert chat.page.locator(".msg.is-streaming").count() == 0
    assert chat.page.locator(".msg-assistant[data-id]").count() == 1


# -- many people, one agent ---------------------------------------------------------------


def test_two_people_on_one_agent_each_see_only_their_own_chat(open_chat, chatui_server, demo):
    demo.config(token_delay=0.03)
    chatui_server.create_user("ben", LIVE_PASSWORD)
    ann = open_chat()
    ben = open_chat(username="ben")
    ann_id = ann.start(ECHO)
    ben_id = ben.start(ECHO)
    assert ann_id != ben_id
    ann.send("my card PIN is 4242, keep it secret /tokens 40")
    ann.wait_streamed("t1")
    ben.send("hello from ben")
    # Ben's reply finishes while Ann's still streams: nobody waits for the agent.
    ben.wait_turn("completed")
    assert ann.last_turn().locator(".turn-footer").get_attribute("data-status") == "running"
    assert ben.assistant_texts() == ["Echo: hello from ben"]
    ann.wait_turn("completed")
    assert "4242" not in ben.page.content()
    assert ben.page.locator("[data-shared-note]").count() == 0
    # Ben cannot open Ann's chat, nor its memory.
    for path in (f"/conversations/{ann_id}/", f"/conversations/{ann_id}/memory/"):
        assert ben.page.request.get(chatui_server.url + path).status == 404
    # What the agent remembers, in Ann's chat: her own human block, the shared persona.
    ann.send('/run core_memory_append {"label": "human", "content": "Keeps a PIN secret"}')
    ann.wait_turn("completed", turns=2)
    ann.page.click("[data-menu] summary")
    ann.page.click("[data-memory-open]")
    panel = ann.page.locator("dialog[open] [data-memory-panel]")
    panel.wait_for()
    own = panel.locator(".memory-block.is-own")
    assert own.locator("h3").all_inner_texts() == ["human"]
    assert "Keeps a PIN secret" in own.inner_text()
    ann.screenshot("memory-panel-desktop-light")
    ben.page.click("[data-menu] summary")
    ben.page.click("[data-memory-open]")
    theirs = ben.page.locator("dialog[open] [data-memory-panel]")
    theirs.wait_for()
    assert "Keeps a PIN secret" not in theirs.inner_text()
    assert ann.errors == [] and ben.errors == []


def test_approve_all_decides_every_parallel_call_at_once(open_chat):
    chat = open_chat()
    ask_approval(chat, ECHO, f"/parallel 3 {RESTART}")
    all_form = chat.page.locator("form[data-decide-all]")
    all_form.wait_for()
    assert chat.page.locator("form[data-decide]").count() == 3
    all_form.locator("input[name=reason]").fill("Go ahead")
    chat.screenshot("approve-all-desktop-light")
    all_form.locator("button[value=approve]").click()
    chat.wait_turn("completed", turns=2)
    assert chat.page.locator("[data-approval][data-state=approved]").count() == 3
    assert chat.page.locator("form[data-decide-all]").count() == 0
    assert chat.page.locator("form[data-decide]").count() == 0
    assert chat.errors == []


def test_the_keyboard_skips_to_the_content_and_tab_from_the_message_box_reaches_send(open_chat):
    chat = open_chat()
    chat.start(ECHO)
    page = chat.page
    page.goto(f"{chat.server.url}/new/")
    page.keyboard.press("Tab")
    skip = page.locator(".skip-link")
    assert skip.evaluate("(el) => el === document.activeElement")
    assert skip.is_visible()
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.closest('main') !== null")
    assert focused  # past the conversation list, in the page's own content
    assert page.evaluate("document.activeElement.matches('.agent-card, a, button')")
    # In a chat: Tab from the (empty) message box goes to Send, not out of the page.
    chat.start(ECHO)
    page.focus("[data-composer-text]")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.matches('[data-send]')")
    assert page.locator("[data-send]").get_attribute("aria-disabled") == "true"
    page.keyboard.press("Enter")  # nothing to send: nothing happens
    assert page.locator(".msg-user").count() == 0
    page.fill("[data-composer-text]", "hello")
    assert page.locator("[data-send]").get_attribute("aria-disabled") == "false"


def test_the_hover_time_covers_none_of_an_answer(chat, demo):
    chat.start(ECHO)
    chat.send("Not during the demo, " + "and a first line long enough to reach the edge " * 4)
    chat.wait_turn("completed")
    answer = chat.last_turn().locator(".msg-assistant").last
    answer.hover()
    time = answer.locator(".msg-meta")
    time.wait_for(state="visible")
    chat.page.wait_for_function(
        "(el) => getComputedStyle(el).opacity === '1'", arg=time.element_handle()
    )
    chat.screenshot("hover-time-desktop-light")
    shown = time.bounding_box()
    text = answer.locator(".md").bounding_box()
    overlap_x = min(shown["x"] + shown["width"], text["x"] + text["width"]) - max(
        shown["x"], text["x"]
    )
    overlap_y = min(shown["y"] + shown["height"], text["y"] + text["height"]) - max(
        shown["y"], text["y"]
    )
    assert overlap_x <= 0 or overlap_y <= 0, (shown, text)


def test_a_retried_reply_folds_the_failed_attempt(chat, demo):
    chat.start(ECHO)
    demo.fault("stream_error", after=3, path="/messages")  # the chat's conversation route
    chat.send("please fail /tokens 12")
    chat.wait_turn("failed")
    chat.last_turn().locator("[data-retry]").click()
    chat.wait_turn("completed")
    fold = chat.last_turn().locator("details.attempt")
    assert fold.count() == 1
    assert fold.locator(":scope > summary").inner_text().startswith("Attempt 1: failed")
    assert not fold.evaluate("(el) => el.open")  # folded away
    assert fold.locator(".msg-assistant").count() == 1
    visible = chat.last_turn().locator(":scope > .msg-assistant .md").all_inner_texts()
    assert visible == [" ".join(f"t{n}" for n in range(1, 13))]
    chat.page.reload()
    chat.wait_connected()
    assert chat.last_turn().locator("details.attempt .msg-assistant").count() == 1


def test_copy_a_message_and_a_code_block(open_chat, chromium, demo):
    chat = open_chat()
    chat.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    chat.start(SAGE)
    chat.send("garden plans")
    chat.wait_turn("completed")
    answer = chat.last_turn().locator(".msg-assistant").last
    answer.hover()
    answer.locator("[data-copy-message]").click()
    answer.locator("[data-copy-message].is-copied").wait_for()
    assert "Copied" in answer.locator("[data-copy-message]").inner_text()
    assert chat.page.locator("[data-announcer]").inner_text() == "Copied to the clipboard."
    copied = chat.page.evaluate("navigator.clipboard.readText()")
    stored = chat.page.evaluate(
        "(el) => el.querySelector('template[data-copy-source]').content.textContent",
        answer.element_handle(),
    )
    assert copied == stored and "```python" in copied  # the markdown, not the page's text
    block = answer.locator(".code-block").first
    assert block.locator(".code-lang").inner_text() == "python"
    block.locator("[data-copy-code]").click()
    code = chat.page.evaluate("navigator.clipboard.readText()")
    assert code == block.locator("pre").inner_text() and "def plan" in code
    mine = chat.last_turn().locator(".msg-user").last
    mine.hover()
    mine.locator("[data-copy-message]").click()
    assert chat.page.evaluate("navigator.clipboard.readText()") == "garden plans"
    chat.screenshot("copy-desktop-light")


def test_a_chosen_dark_theme_paints_dark_on_a_light_system(open_chat):
    chat = open_chat(color_scheme="light")
    chat.start(ECHO)
    page = chat.page
    page.click(".theme-option[value=dark]")
    page.wait_for_load_state()
    # Painted dark by the server's markup itself: no script runs before the first paint.
    raw = page.request.get(page.url).text()
    assert '<html lang="en" data-theme="dark">' in raw
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(23, 24, 28)", background  # --bg in dark
    chat.screenshot("theme-dark-chosen-desktop")
    page.click(".theme-option[value=system]")
    page.wait_for_load_state()
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"


def test_search_finds_a_conversation_by_what_was_said_and_opens_it(open_chat, demo):
    chat = open_chat()
    chat.start(ECHO)
    chat.send("Remember the marmalade recipe for grandmother")
    chat.wait_turn("completed")
    chat.start(ECHO)
    chat.send("Something else entirely")
    chat.wait_turn("completed")
    page = chat.page
    field = page.locator("[data-search-input]")
    field.fill("marmal")
    hit = page.locator("[data-search-hit]").first
    hit.wait_for()
    assert page.locator("[data-conversation-list]").is_hidden()
    assert page.locator("[data-search-hit]").count() == 1
    assert hit.locator("mark").first.inner_text().lower() == "marmal"
    assert "grandmother" in hit.inner_text()
    chat.screenshot("search-desktop-light")
    # By keyboard: down to the result, Enter opens it at the matching message.
    field.press("ArrowDown")
    assert page.evaluate("document.activeElement.matches('[data-search-hit]')")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/conversations/\d+/#message-\d+$"))
    page.locator(".msg.is-linked").wait_for()
    assert "marmalade" in page.locator(".msg.is-linked").inner_text()
    # Escape gives the list back.
    field = page.locator("[data-search-input]")
    field.fill("nothing matches this")
    page.locator(".search-summary").wait_for()
    assert "No conversation matches" in page.locator(".search-summary").inner_text()
    field.press("Escape")
    page.locator("[data-conversation-list]").wait_for()
    assert page.locator("[data-search-results]").is_hidden()


@pytest.mark.parametrize("viewport,scheme", [(PHONE, "light"), (PHONE, "dark"), (DESKTOP, "dark")])
def test_search_results_at_phone_width_and_in_dark(open_chat, demo, viewport, scheme):
    chat = open_chat(viewport=viewport, color_scheme=scheme)
    chat.start(ECHO)
    chat.send("Notes about the lighthouse keeper")
    chat.wait_turn("completed")
    page = chat.page
    if viewport is PHONE:
        page.locator("[data-drawer-toggle]").first.click()
    page.locator("[data-search-input]").fill("lighthouse")
    page.locator("[data-search-hit]").first.wait_for()
    name = "phone" if viewport is PHONE else "desktop"
    chat.screenshot(f"search-{name}-{scheme}")


def test_pin_rename_in_place_and_delete_from_the_sidebar_by_keyboard(open_chat, demo):
    chat = open_chat()
    chat.start(ECHO)
    chat.send("First chat about apples")
    chat.wait_turn("completed")
    first = chat.page.url
    chat.start(ECHO)
    chat.send("Second chat about pears")
    chat.wait_turn("completed")
    page = chat.page
    item = page.locator("[data-conversation-item]").filter(has_text="First chat about apples")
    assert page.locator(".conversation-group-label").first.inner_text() == "Today"
    # Pin, by keyboard: the item's menu, then its first entry.
    item.locator("summary").focus()
    page.keyboard.press("Enter")
    item.locator("form[data-pin] button").focus()
    page.keyboard.press("Enter")
    page.locator('.conversation-group[data-group="Pinned"]').wait_for()
    pinned = page.locator('.conversation-group[data-group="Pinned"] [data-conversation-item]')
    assert pinned.count() == 1 and "apples" in pinned.inner_text()
    assert page.evaluate("document.activeElement.closest('[data-conversation-item]') !== null")
    # The list the pin brought back is the one a search hides, and shows again.
    page.locator("[data-search-input]").fill("apples")
    page.locator("[data-search-hit]").first.wait_for()
    assert page.locator("[data-conversation-list]").is_hidden()
    page.locator("[data-search-input]").press("Escape")
    page.locator("[data-conversation-list]").wait_for()
    # Rename the current chat in place: the sidebar and the page's heading follow.
    current = page.locator("[data-conversation-item].is-current")
    current.locator("summary").click()
    current.locator("form[data-rename] button").click()
    field = page.locator(".rename-field")
    field.wait_for()
    assert field.evaluate("(el) => el === document.activeElement")
    field.fill("Pear orchard")
    field.press("Enter")
    page.locator("h1[data-conversation-title]", has_text="Pear orchard").wait_for()
    assert current.locator("[data-title-text]").inner_text() == "Pear orchard"
    assert page.title().startswith("Pear orchard")
    # Escape keeps the old title.
    current.locator("summary").click()
    current.locator("form[data-rename] button").click()
    page.locator(".rename-field").fill("Never saved")
    page.locator(".rename-field").press("Escape")
    assert current.locator("[data-title-text]").inner_text() == "Pear orchard"
    page.reload()
    assert page.locator("h1[data-conversation-title]").inner_text() == "Pear orchard"
    chat.screenshot("sidebar-organised-desktop-light")
    # Delete the pinned one from the sidebar: asked once; this page stays.
    pinned = page.locator('.conversation-group[data-group="Pinned"] [data-conversation-item]')
    pinned.locator("summary").click()
    chat.accept_dialogs = True
    pinned.locator("button.menu-danger").click()
    page.locator('.conversation-group[data-group="Pinned"]').wait_for(state="detached")
    assert "apples" in chat.dialogs[-1]
    assert page.locator("h1[data-conversation-title]").inner_text() == "Pear orchard"
    assert page.request.get(first).status == 404


@pytest.mark.parametrize("viewport,scheme", [(PHONE, "light"), (DESKTOP, "dark"), (PHONE, "dark")])
def test_the_organised_sidebar_at_phone_width_and_in_dark(open_chat, demo, viewport, scheme):
    chat = open_chat(viewport=viewport, color_scheme=scheme)
    chat.start(ECHO)
    chat.send("A chat to pin")
    chat.wait_turn("completed")
    page = chat.page
    if viewport is PHONE:
        page.locator("[data-drawer-toggle]").first.click()
    item = page.locator("[data-conversation-item].is-current")
    item.locator("summary").click()
    item.locator("form[data-pin] button").click()
    page.locator('.conversation-group[data-group="Pinned"]').wait_for()
    item = page.locator("[data-conversation-item].is-current")
    item.locator("summary").click()
    item.locator(".conversation-menu").wait_for()
    name = "phone" if viewport is PHONE else "desktop"
    chat.screenshot(f"sidebar-organised-{name}-{scheme}")
    item.locator("form[data-pin] button").click()  # unpinned again for the next test
    page.locator('.conversation-group[data-group="Pinned"]').wait_for(state="detached")


# Records every notification the page shows, keeping the browser's own permission.
RECORD_NOTIFICATIONS = """
window.__notes = [];
if (window.Notification) {
  const Real = window.Notification;
  window.Notification = class extends Real {
    constructor(title, options) {
      super(title, options);
      window.__notes.push({ title, body: (options && options.body) || "" });
    }
  };
}
"""
HIDE = """
Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
document.dispatchEvent(new Event("visibilitychange"));
"""
SHOW = """
delete document.hidden;
delete document.visibilityState;
document.dispatchEvent(new Event("visibilitychange"));
"""


def test_a_hidden_tab_counts_replies_and_decisions_in_its_title_and_notifies(open_chat, demo):
    chat = open_chat()
    page = chat.page
    page.context.grant_permissions(["notifications"])
    page.context.add_init_script(RECORD_NOTIFICATIONS)
    chat.start(ECHO)
    assert page.locator("[data-notify]").is_hidden()  # allowed already: nothing to ask
    # Looking at the page: nothing is counted (the first message names the chat).
    chat.send("seen as it happens")
    chat.wait_turn("completed")
    title = page.title()
    assert title == "seen as it happens · chatui" and page.evaluate("window.__notes") == []
    # Hidden: the reply counts, and notifies.
    page.evaluate(HIDE)
    chat.send("tell me when you are done")
    chat.wait_turn("completed", turns=2)
    page.wait_for_function("document.title.startsWith('(1) ')")
    [note] = page.evaluate("window.__notes")
    assert note["title"] == "Demo · Echo replied"
    assert "tell me when you are done" in note["body"]
    page.evaluate(SHOW)
    page.wait_for_function("!document.title.startsWith('(')")
    assert page.title() == title

    # The approval console, in a hidden tab, for a request made in another.
    console = open_chat()
    console.page.context.grant_permissions(["notifications"])
    console.page.context.add_init_script(RECORD_NOTIFICATIONS)
    console.page.goto(f"{console.server.url}/approvals/")
    console.page.evaluate(HIDE)
    # The chat that asks, hidden too: the agent waits for the person.
    asking = open_chat()
    asking.page.context.grant_permissions(["notifications"])
    asking.page.context.add_init_script(RECORD_NOTIFICATIONS)
    asking.start(OPS)
    asking.page.evaluate(HIDE)
    asking.send(RESTART)
    asking.wait_turn("completed")
    asking.page.wait_for_function("document.title.startsWith('(1) ')")
    assert asking.page.evaluate("window.__notes")[-1]["title"] == "Demo · Ops is waiting for you"
    console.page.locator("[data-approval-card]").first.wait_for()
    console.page.wait_for_function("document.title.startsWith('(1) ')")
    notes = console.page.evaluate("window.__notes")
    assert notes[-1]["title"] == "A tool call waits for a decision"
    asking.page.evaluate(SHOW)
    asking.waiting_form().locator("button[value=approve]").click()
    asking.wait_approval("approved")


def test_notify_me_asks_for_the_permission(open_chat):
    chat = open_chat()
    chat.start(ECHO)
    button = chat.page.locator("[data-notify]")
    button.wait_for()
    assert button.inner_text() == "Notify me in other tabs"
    chat.page.context.grant_permissions(["notifications"])
    button.click()
    button.wait_for(state="hidden")


@pytest.mark.parametrize(
    "viewport,scheme", [(DESKTOP, "light"), (DESKTOP, "dark"), (PHONE, "light"), (PHONE, "dark")]
)
def test_the_admin_overview_draws_its_charts(open_chat, chatui_server, demo, viewport, scheme):
    chatui_server.create_user("overseer", LIVE_PASSWORD, superuser=True)
    someone = open_chat()
    someone.start(ECHO)
    someone.send("something to count")
    someone.wait_turn("completed")
    chat = open_chat(viewport=viewport, color_scheme=scheme, username="overseer")
    page = chat.page
    page.goto(f"{chatui_server.url}/admin/")
    page.click("a[href='/admin/overview/']")
    page.wait_for_url(re.compile(r"/admin/overview/$"))
    charts = page.locator("svg.chart")
    assert charts.count() == 6
    assert charts.first.locator("rect").count() >= 1  # today's conversation, drawn
    page.locator("figure details summary").first.click()
    assert page.locator("figure table").first.is_visible()
    # The chart's text reads in either theme: its colour is the admin's own text colour.
    fill = page.evaluate("getComputedStyle(document.querySelector('svg.chart .tick')).fill")
    body = page.evaluate("getComputedStyle(document.body).color")
    assert fill != "rgb(0, 0, 0)" or body == "rgb(0, 0, 0)", (fill, body)
    name = "phone" if viewport is PHONE else "desktop"
    chat.screenshot(f"admin-overview-{name}-{scheme}")


@pytest.mark.parametrize("viewport,scheme", [(PHONE, "light"), (PHONE, "dark"), (DESKTOP, "dark")])
def test_copy_at_phone_width_and_in_dark(open_chat, demo, viewport, scheme):
    chat = open_chat(viewport=viewport, color_scheme=scheme)
    chat.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    chat.start(SAGE)
    chat.send("garden plans")
    chat.wait_turn("completed")
    answer = chat.last_turn().locator(".msg-assistant").last
    answer.locator(".code-block [data-copy-code]").first.click()
    answer.locator(".code-block [data-copy-code].is-copied").first.wait_for()
    assert "def plan" in chat.page.evaluate("navigator.clipboard.readText()")
    name = "phone" if viewport is PHONE else "desktop"
    chat.screenshot(f"copy-{name}-{scheme}")
