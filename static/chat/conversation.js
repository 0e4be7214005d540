/* A conversation page, put together: its socket and sync (socket.js), the transcript
 * (transcript.js), the composer (composer.js), decisions on tool calls
 * (decisions.js) and feedback (feedback.js). Here: what each frame from the server
 * does to them (see "The websocket protocol" in README.md), the latest turn, what a
 * hidden tab or a screen reader is told when a turn ends, toasts, Stop, Retry, and the
 * panels (reply settings, the agent's memory) in a dialog over the conversation. */

import { attr, element, localTimes } from "./dom.js";
import { attention, dismissButton } from "./page.js";
import { Composer } from "./composer.js";
import { Decisions } from "./decisions.js";
import { Feedback } from "./feedback.js";
import { ConversationSocket } from "./socket.js";
import { ACTIVE, Transcript } from "./transcript.js";

export function Conversation(config) {
  const toasts = document.querySelector("[data-toasts]");
  const announcer = document.querySelector("[data-announcer]");
  const title = document.querySelector("[data-conversation-title]");
  const menu = document.querySelector("[data-menu]");
  const dialog = document.querySelector("[data-options-dialog]");

  let latestTurn = config.turn;
  // Turns this page saw running: only their end is news for a hidden tab.
  const seenRunning = new Set(config.turn && ACTIVE.has(config.turn.status) ? [config.turn.id] : []);
  let titled = Boolean(config.titled);

  const busy = () => Boolean(latestTurn && ACTIVE.has(latestTurn.status));
  const view = Transcript({ config, toast, gap: () => socket.resync() });
  const socket = ConversationSocket({
    url: config.socket,
    lastId: view.lastId,
    busy,
    received,
    changed: () => composer.update(),
  });
  const composer = Composer({ config, socket, busy, stop, view, toast });
  const decisions = Decisions({ transcript: view.element, transmit: socket.transmit, toast });
  Feedback({ transcript: view.element, toast });

  // `cause`: what the toast is about (an error code); it goes when its cause does.
  function toast(message, cause) {
    const node = element("div", "toast");
    node.setAttribute("role", "alert");
    if (cause) node.dataset.cause = cause;
    node.append(element("p", "", message), dismissButton(node));
    toasts.append(node);
    while (toasts.children.length > 3) toasts.firstElementChild.remove();
    window.setTimeout(() => node.remove(), 8000);
  }

  // -- frames

  function received(frame) {
    switch (frame.type) {
      case "message":
        onMessage(frame.message);
        break;
      case "delta":
        view.delta(frame);
        break;
      case "snapshot":
        if (frame.turn) onTurn(frame.turn);
        view.snapshot(frame);
        break;
      case "turn":
        if (!view.shownAlready(frame.turn)) onTurn(frame.turn);
        break;
      case "approval":
        decisions.update(frame.approval);
        break;
      case "retract":
        view.retract(frame.ids);
        break;
      case "synced":
        composer.flush();
        break;
      case "error":
        onError(frame);
        break;
      default:
        break;
    }
  }

  function onMessage(message) {
    const node = view.message(message, composer.confirm);
    if (node && message.kind === "user") userMessageArrived(node);
  }

  // The first message titles a chat; every message brings it to the top of Today.
  function userMessageArrived(node) {
    const text = node.querySelector(".bubble")?.textContent || "";
    const link = document.querySelector(
      `.conversation-link[data-conversation="${attr(config.conversation)}"]`,
    );
    if (!titled && text.trim()) {
      titled = true;
      const newTitle = text.split(/\s+/).filter(Boolean).join(" ").slice(0, 80);
      title.textContent = newTitle;
      document.title = `${newTitle} · chatui`;
      if (link) link.querySelector("[data-title-text]").textContent = newTitle;
    }
    if (link) {
      const time = link.querySelector("time");
      if (time) time.textContent = "just now";
      // To the top of Today, unless it is pinned (pins keep their place).
      const item = link.closest("[data-conversation-item]");
      const today = document.querySelector('.conversation-group[data-group="Today"] ul');
      if (item && today && !item.querySelector(".pin-mark")) today.prepend(item);
    }
  }

  function onTurn(turn) {
    if (!latestTurn || turn.id >= latestTurn.id) latestTurn = turn;
    const latest = turn.id === latestTurn.id;
    const section = view.turn(turn, latest);
    if (turn.memory_changed) refreshMemory();
    if (!ACTIVE.has(turn.status)) {
      if (latest) announce(section, turn);
      if (seenRunning.delete(turn.id)) callAttention(section, turn);
    } else {
      seenRunning.add(turn.id);
    }
    composer.update();
  }

  function onError(frame) {
    if (decisions.answered(frame)) return;
    toast(frame.message || "Something went wrong.", frame.code);
    composer.refused(frame);
    if (frame.code === "approval_pending") decisions.pointAt(frame.approvals);
    composer.update();
  }

  // -- when a turn ends

  // A turn this page saw running ended: a hidden tab says so (a reply, a question,
  // or a tool call waiting for a decision).
  function callAttention(section, turn) {
    const waiting = decisions.waitingIn(section);
    let body = "";
    if (waiting) body = `${config.agentName} ${waiting}.`;
    else if (turn.status === "completed") {
      const answer = view.replyText(section);
      body = answer.length > 140 ? `${answer.slice(0, 140)}…` : answer || "Finished.";
    } else if (turn.status === "failed") body = "The reply failed.";
    else return; // stopped by the person: nothing to tell them
    const heading = waiting ? `${config.agentName} is waiting for you` : `${config.agentName} replied`;
    attention.note(heading, body, `turn-${turn.id}`);
  }

  // What a screen reader hears.
  function announce(section, turn) {
    let text;
    if (turn.status === "completed") {
      const reply = view.replyText(section);
      text = reply
        ? `${config.agentName} replied: ${reply.length > 400 ? `${reply.slice(0, 400)}…` : reply}`
        : `${config.agentName} finished.`;
    } else if (turn.status === "cancelled") {
      text = "The reply was stopped.";
    } else {
      text = `The reply failed. ${turn.error || ""}`;
    }
    announcer.textContent = text;
  }

  // -- Stop and Retry

  function stop() {
    if (!busy()) return;
    socket.transmit({ type: "stop" });
    const status = view.statusOf(latestTurn.id);
    if (status) status.textContent = "Stopping…";
  }

  view.element.addEventListener("click", (event) => {
    const retry = event.target.closest("[data-retry]");
    if (!retry) return;
    retry.disabled = true;
    if (!socket.transmit({ type: "retry", turn: Number(retry.dataset.retry) })) {
      retry.disabled = false;
      toast("Not connected. Retry once the connection is back.");
    }
  });

  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.isComposing || event.defaultPrevented) return;
    if (dialog.open) return; // Esc closes the dialog, and does nothing else
    if (menu && menu.open) {
      menu.open = false;
      menu.querySelector("summary").focus();
    } else if (busy()) {
      event.preventDefault();
      stop();
    }
  });

  // -- panels in a dialog over the conversation: reply settings, the agent's memory

  // The link whose panel the dialog shows (refreshed when the memory changes).
  let panelLink = null;

  async function loadPanel(link) {
    const url = new URL(link.href, window.location.href);
    url.searchParams.set("panel", "1");
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    dialog.innerHTML = await response.text();
    dialog.setAttribute("aria-label", link.dataset.panelLabel || link.textContent.trim());
  }

  async function openPanel(link) {
    try {
      await loadPanel(link);
    } catch (error) {
      window.location.href = link.href;
      return;
    }
    panelLink = link;
    if (menu) menu.open = false;
    dialog.showModal();
    const first = dialog.querySelector("select, input:not([type=hidden]), [data-dialog-close]");
    if (first) first.focus();
  }

  function refreshMemory() {
    // The agent edited its memory: a memory panel that is open shows the new text.
    if (dialog.open && panelLink && panelLink.hasAttribute("data-memory-open")) {
      loadPanel(panelLink).catch(() => {});
    }
  }

  document.querySelectorAll("[data-options-open], [data-memory-open]").forEach((link) =>
    link.addEventListener("click", (event) => {
      event.preventDefault();
      openPanel(link);
    }),
  );
  dialog.addEventListener("click", (event) => {
    // A click on the backdrop, or on Close or Cancel, closes it.
    if (event.target === dialog || event.target.closest("[data-dialog-close]")) {
      event.preventDefault();
      dialog.close();
    }
  });

  // -- start

  localTimes(document);
  composer.update();
  view.start();
  socket.start();
}
