/* A conversation page: its socket and sync (see "The websocket protocol" in README.md),
 * the streaming text (markdown-it and DOMPurify; tool arguments as plain text), the
 * composer with its images, decisions on tool calls, feedback and Stop/Retry. */

import { RECONNECT_DELAYS, attr, decorateCode, element, localTimes, parseHTML, parsedFrame, postForJson, socketUrl } from "./dom.js";
import { attention, dismissButton } from "./page.js";
import { Attachments } from "./attachments.js";

const ACTIVE = new Set(["queued", "running"]);
const TOOL_KINDS = new Set(["tool_call", "approval_request"]);

// How long a running turn may stay quiet before the page syncs again (ms), at first
// and at most.
const QUIET_RESYNC = 5000;
const QUIET_RESYNC_MAX = 60000;
// Error codes answering a stop, retry or decision, never a send.
const NOT_ABOUT_SENDING = new Set([
  "not_retryable",
  "not_found",
  "forbidden",
  "already_decided",
  "unknown_type",
]);
// Error codes that answer a decision sent from an approval form.
const ABOUT_DECIDING = new Set(["not_found", "forbidden", "already_decided", "bad_frame", "turn_active"]);

function markdownRenderer() {
  if (!window.markdownit || !window.DOMPurify) return null;
  const md = window.markdownit({ html: false, linkify: true, typographer: false });
  const purify = window.DOMPurify;
  purify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") node.setAttribute("rel", "noopener noreferrer nofollow");
  });
  return (text) =>
    purify.sanitize(md.render(text), {
      FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
      FORBID_ATTR: ["style"],
    });
}

function otid() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  // crypto.randomUUID needs a secure context; getRandomValues does not.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// ---- the conversation page --------------------------------------------------

export function Conversation(config) {
  const transcript = document.querySelector("[data-transcript]");
  const scroller = document.querySelector("[data-transcript-scroll]");
  const pendingArea = document.querySelector("[data-pending]");
  const form = document.querySelector("[data-composer]");
  const textarea = document.querySelector("[data-composer-text]");
  const sendButton = document.querySelector("[data-send]");
  const stopButton = document.querySelector("[data-stop]");
  const jumpButton = document.querySelector("[data-jump]");
  const toasts = document.querySelector("[data-toasts]");
  const connection = document.querySelector("[data-connection]");
  const announcer = document.querySelector("[data-announcer]");
  const title = document.querySelector("[data-conversation-title]");
  const menu = document.querySelector("[data-menu]");
  const tray = document.querySelector("[data-attachments]");
  const attachButton = document.querySelector("[data-attach]");
  const fileInput = document.querySelector("[data-attach-input]");
  const dropZone = document.querySelector("[data-drop-zone]");
  const dialog = document.querySelector("[data-options-dialog]");
  const main = document.querySelector(".main");
  const renderMarkdown = markdownRenderer();
  const members = config.members || [];

  // key -> {el, kind, turn, text, body, calls: Map(tool_call_id -> {text, name, el, pre})}
  const streams = new Map();
  // otid -> {text, images, el, sent}
  const pending = new Map();
  // Images attached in the composer, uploading at once.
  const attachments = Attachments({
    limits: config.images,
    uploadUrl: config.uploadUrl,
    tray,
    attachButton,
    fileInput,
    textarea,
    main,
    dropZone,
    toast,
    changed: updateComposer,
  });
  // The approval form whose decision went out and awaits an answer.
  let deciding = null;
  let latestTurn = config.turn;
  // Turns this page saw running: only their end is news for a hidden tab.
  const seenRunning = new Set(config.turn && ACTIVE.has(config.turn.status) ? [config.turn.id] : []);
  let socket = null;
  let synced = false;
  // When the last frame arrived: a running turn that stays quiet longer than
  // `quietFor` may have ended in a frame that never came (see resync()). Each quiet
  // sync doubles the wait, so a busy server is not asked again and again.
  let lastFrameAt = Date.now();
  let quietFor = QUIET_RESYNC;
  let attempt = 0;
  let reconnectTimer = null;
  let closedForGood = false;
  let pinned = true;
  let renderQueued = false;
  let loadingOlder = false;
  let titled = Boolean(config.titled);

  function isBusy() {
    return Boolean(latestTurn && ACTIVE.has(latestTurn.status));
  }

  function lastId() {
    let newest = 0;
    transcript.querySelectorAll("[data-id]").forEach((node) => {
      newest = Math.max(newest, Number(node.dataset.id) || 0);
    });
    return newest;
  }

  // -- scrolling: stay at the bottom only while the reader is there

  function distanceFromBottom() {
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight;
  }

  function stick(force) {
    if (force || pinned) {
      scroller.scrollTop = scroller.scrollHeight;
      pinned = true;
      jumpButton.hidden = true;
    } else {
      jumpButton.hidden = false;
    }
  }

  scroller.addEventListener(
    "scroll",
    () => {
      pinned = distanceFromBottom() < 48;
      if (pinned) jumpButton.hidden = true;
    },
    { passive: true },
  );
  jumpButton.addEventListener("click", () => stick(true));

  // -- where messages go

  function removeEmptyState() {
    const empty = transcript.querySelector("[data-empty]");
    if (empty) empty.remove();
  }

  function turnSection(turnId) {
    let section = transcript.querySelector(`section.turn[data-turn="${attr(turnId)}"]`);
    if (!section) {
      section = element("section", "turn");
      section.dataset.turn = turnId;
      const footer = element("footer", "turn-footer");
      footer.dataset.turn = turnId;
      section.append(footer);
      transcript.insertBefore(section, pendingArea);
      removeEmptyState();
    }
    return section;
  }

  function footerOf(section) {
    return section.querySelector(":scope > .turn-footer");
  }

  function insertStored(turnId, node) {
    if (!turnId) {
      const section = element("section", "turn");
      section.append(node);
      transcript.insertBefore(section, pendingArea);
      removeEmptyState();
      return;
    }
    const section = turnSection(turnId);
    // Stored messages come before whatever is still streaming in the turn.
    const before = section.querySelector(":scope > .msg.is-streaming") || footerOf(section);
    section.insertBefore(node, before);
  }

  function storedElement(key) {
    return transcript.querySelector(`.msg[data-key="${attr(key)}"][data-id]`);
  }

  function streamingElement(key) {
    return transcript.querySelector(`.msg[data-key="${attr(key)}"]:not([data-id])`);
  }

  // -- streaming elements, shaped like chat/_message.html

  function createStream(key, kind, turnId, sender) {
    const el = element("article", `msg msg-${kind} is-streaming is-new`);
    const member = sender && members.find((item) => item.name === sender);
    if (member) el.classList.add("from-member", `sender-${member.colour}`);
    el.dataset.key = key;
    el.dataset.kind = kind;
    if (turnId) el.dataset.turn = turnId;
    if (sender && !TOOL_KINDS.has(kind)) el.append(element("div", "msg-sender", sender));
    const stream = { el, kind, turn: turnId, text: "", body: null, calls: new Map() };
    if (TOOL_KINDS.has(kind)) {
      stream.body = element("div", "card tool-card");
      el.append(stream.body);
    } else if (kind === "reasoning") {
      const details = element("details", "reasoning");
      details.open = true;
      const summary = element("summary");
      summary.append(element("span", "reasoning-label", "Thinking"));
      summary.addEventListener("click", () => {
        details.dataset.touched = "1";
      });
      stream.body = element("div", "md");
      details.append(summary, stream.body);
      el.append(details);
    } else {
      stream.body = element("div", "md");
      el.append(stream.body);
    }
    el.append(element("div", "msg-meta"));
    const existing = streamingElement(key);
    if (existing) existing.replaceWith(el);
    else if (turnId) {
      const section = turnSection(turnId);
      section.insertBefore(el, footerOf(section));
    } else transcript.insertBefore(el, pendingArea);
    streams.set(key, stream);
    return stream;
  }

  function addCall(stream, callId, name) {
    const section = element("section", "tool-call");
    section.dataset.callId = callId || "";
    const head = element("header", "card-head");
    const chip = element(
      "span",
      stream.kind === "approval_request" ? "chip chip-approval" : "chip",
      stream.kind === "approval_request" ? "Needs approval" : "Tool call",
    );
    const nameNode = element("code", "tool-name", name || "…");
    head.append(chip, nameNode);
    const pre = element("pre", "tool-args");
    section.append(head, pre);
    stream.body.append(section);
    const call = { text: "", name: name || "", nameNode, pre };
    stream.calls.set(callId || "", call);
    return call;
  }

  function renderStream(stream) {
    if (TOOL_KINDS.has(stream.kind)) return;
    if (renderMarkdown) stream.body.innerHTML = renderMarkdown(stream.text);
    else stream.body.textContent = stream.text;
  }

  function scheduleRender(stream) {
    stream.dirty = true;
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      streams.forEach((item) => {
        if (item.dirty) {
          item.dirty = false;
          renderStream(item);
        }
      });
      stick();
    });
  }

  // -- frames

  function onMessage(message) {
    const node = parseHTML(message.html).firstElementChild;
    if (!node) return;
    localTimes(node);
    decorateCode(node);
    const shown = transcript.querySelector(`.msg[data-id="${attr(message.id)}"]`);
    if (shown) {
      // A stored message brought up to date (after a Stop, Letta may send one last
      // piece): show what is stored now, as a reload would.
      if (shown.outerHTML !== node.outerHTML) shown.replaceWith(node);
      return;
    }
    const waiting = node.dataset.otid && pending.get(node.dataset.otid);
    if (waiting) {
      waiting.el.remove();
      pending.delete(node.dataset.otid);
    }
    const streaming = streamingElement(message.key);
    if (streaming) {
      // Someone who opened the reasoning while it streamed keeps it open.
      const details = streaming.querySelector("details[data-touched]");
      const stored = node.querySelector("details");
      if (details && stored) stored.open = details.open;
      streaming.replaceWith(node);
    } else {
      // A confirmed send takes its "Sending…" bubble's place without fading in again.
      if (!waiting) node.classList.add("is-new");
      insertStored(message.turn, node);
    }
    streams.delete(message.key);
    if (message.kind === "user") userMessageArrived(node);
    stick();
  }

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

  function onApproval(approval) {
    transcript.querySelectorAll(`[data-approval="${attr(approval.id)}"]`).forEach((old) => {
      const node = parseHTML(approval.html).firstElementChild;
      if (!node) return;
      node.classList.add("is-fresh");
      localTimes(node);
      const card = old.closest(".tool-card");
      if (deciding && old.contains(deciding)) deciding = null;
      old.replaceWith(node);
      if (card && !card.querySelector("form[data-decide]")) card.classList.remove("is-attention");
    });
    // "All N at once" only while more than one call still waits for an approval.
    transcript.querySelectorAll("form[data-decide-all]").forEach((all) => {
      const slot = all.closest(".approval-slot");
      if (slot.querySelectorAll('[data-kind="approval"] form[data-decide]').length < 2) {
        all.remove();
      }
    });
    // "The agent is waiting for a decision" is over once nothing waits any more.
    if (!transcript.querySelector("form[data-decide]")) {
      toasts.querySelectorAll('[data-cause="approval_pending"]').forEach((node) => node.remove());
    }
  }

  function pointAt(approvalIds) {
    const forms = (approvalIds || [])
      .map((id) => transcript.querySelector(`form[data-decide="${attr(id)}"]`))
      .filter(Boolean);
    const form = forms[0] || transcript.querySelector("form[data-decide]");
    if (!form) return;
    const card = form.closest(".tool-card") || form;
    card.classList.remove("is-attention");
    void card.offsetWidth; // restart the animation
    card.classList.add("is-attention");
    card.scrollIntoView({ block: "center", behavior: "smooth" });
    const first = form.querySelector("textarea, input:not([type=hidden]), button");
    if (first) first.focus({ preventScroll: true });
  }

  // A delta that starts beyond the text the page has, or a running turn quiet for
  // too long: a frame went missing on the way (a worker under load may drop some).
  // Sync again; the answer fills the gap, and a turn that ended meanwhile comes in
  // its final state. While a sync is under way its snapshot will fill the gap.
  function resync() {
    if (synced && transmit({ type: "sync", after: lastId() })) synced = false;
  }

  // A sync sends the latest turn even when it ended long ago: a footer that already
  // shows that ending stays as it is.
  function shownAlready(turn) {
    if (ACTIVE.has(turn.status) || turn.stopping) return false;
    const footer = transcript.querySelector(`.turn-footer[data-turn="${attr(turn.id)}"]`);
    return Boolean(footer && footer.dataset.status === turn.status);
  }

  function onDelta(frame) {
    for (const delta of frame.deltas) {
      if (storedElement(delta.key)) continue;
      let stream = streams.get(delta.key);
      if (!stream) {
        // Joined mid-message: wait for the snapshot rather than show a fragment.
        if (delta.offset > 0) {
          resync();
          continue;
        }
        const sender = TOOL_KINDS.has(delta.kind) ? "" : delta.sender || "";
        stream = createStream(delta.key, delta.kind, frame.turn, sender);
      }
      if (delta.field === "arguments") {
        const callId = delta.tool_call_id || "";
        let call = stream.calls.get(callId);
        if (!call) {
          if (delta.offset > 0) {
            resync();
            continue;
          }
          call = addCall(stream, callId, delta.name);
        }
        if (delta.name && !call.name) {
          call.name = delta.name;
          call.nameNode.textContent = delta.name;
        }
        if (delta.offset > call.text.length) {
          resync();
          continue;
        }
        call.text += delta.text.slice(call.text.length - delta.offset);
        call.pre.textContent = call.text;
        stick();
      } else {
        if (delta.offset > stream.text.length) {
          resync();
          continue;
        }
        stream.text += delta.text.slice(stream.text.length - delta.offset);
        scheduleRender(stream);
      }
    }
  }

  function onSnapshot(frame) {
    const turnId = frame.turn ? frame.turn.id : null;
    if (frame.turn) onTurn(frame.turn);
    for (const open of frame.open) {
      if (storedElement(open.key)) continue;
      const stream =
        streams.get(open.key) || createStream(open.key, open.kind, turnId, open.sender);
      if (TOOL_KINDS.has(open.kind)) {
        for (const tool of open.tool_calls) {
          const callId = tool.tool_call_id || "";
          const call = stream.calls.get(callId) || addCall(stream, callId, tool.name);
          if (tool.name && !call.name) {
            call.name = tool.name;
            call.nameNode.textContent = tool.name;
          }
          if ((tool.arguments || "").length >= call.text.length) {
            call.text = tool.arguments || "";
            call.pre.textContent = call.text;
          }
        }
      } else if (open.text.length >= stream.text.length) {
        stream.text = open.text;
        scheduleRender(stream);
      }
    }
    stick();
  }

  function renderFooter(footer, turn) {
    const stopping = Boolean(turn.stopping) && ACTIVE.has(turn.status);
    footer.dataset.status = turn.status;
    const parts = [];
    const indicator = element("span", "turn-indicator");
    indicator.setAttribute("aria-hidden", "true");
    indicator.append(element("i"), element("i"), element("i"));
    let label = turn.status_label;
    if (stopping) label = "Stopping…";
    else if (turn.waiting && ACTIVE.has(turn.status)) label = workingLabel();
    parts.push(indicator, element("span", "turn-status", label));
    // Only a stop reason that tells the person something, in words (turn.reason_label);
    // tokens and the raw reason stay in the time's tooltip.
    if (turn.reason_label) parts.push(element("span", "turn-reason", turn.reason_label));
    if (!ACTIVE.has(turn.status)) {
      const time = element("time", "turn-time");
      time.setAttribute("datetime", new Date().toISOString());
      const details = [];
      const total = turn.usage && turn.usage.total_tokens;
      if (Number.isInteger(total)) {
        const figures = Object.entries(turn.usage)
          .filter(([, value]) => Number.isInteger(value))
          .map(([key, value]) => `${key.replaceAll("_", " ")}: ${value.toLocaleString()}`)
          .join(", ");
        details.push(`${total.toLocaleString()} token${total === 1 ? "" : "s"} (${figures})`);
      }
      if (turn.stop_reason) details.push(`stop reason: ${turn.stop_reason}`);
      time.title = details.join(" · ");
      parts.push(time);
    }
    if (turn.error) {
      const error = element("p", "turn-error", turn.error);
      error.setAttribute("role", "note");
      parts.push(error);
    }
    if (turn.retryable && latestTurn && turn.id === latestTurn.id) {
      const retry = element("button", "button button-small retry", "Retry");
      retry.type = "button";
      retry.dataset.retry = turn.id;
      parts.push(retry);
    }
    footer.replaceChildren(...parts);
    localTimes(footer);
  }

  // "Ada and Lin are working…": a group that answers only once everyone spoke.
  function workingLabel() {
    const names = members.length ? members.map((item) => item.name) : [config.agentName];
    const listed =
      names.length > 1 ? `${names.slice(0, -1).join(", ")} and ${names[names.length - 1]}` : names[0];
    return `${listed} ${names.length > 1 ? "are" : "is"} working…`;
  }

  // A retried turn: what its earlier attempts showed folds into "Attempt 1: failed"
  // blocks, as the page renders them after a reload.
  function foldEarlierAttempts(section, turn) {
    if (!turn.attempt || turn.attempt < 2) return;
    const outcomes = new Map((turn.earlier_attempts || []).map((item) => [item.attempt, item]));
    const loose = [...section.querySelectorAll(":scope > .msg[data-attempt]")].filter(
      (node) => node.dataset.kind !== "user" && Number(node.dataset.attempt) < turn.attempt,
    );
    for (const node of loose) {
      const number = Number(node.dataset.attempt);
      let fold = section.querySelector(`:scope > details[data-attempt-fold="${number}"]`);
      if (!fold) {
        fold = element("details", "attempt");
        fold.dataset.attemptFold = String(number);
        const outcome = outcomes.get(number) || { status_label: "Ended", error: "" };
        const summary = `Attempt ${number}: ${outcome.status_label.toLowerCase()}`;
        fold.append(element("summary", "", outcome.error ? `${summary} · ${outcome.error}` : summary));
        node.before(fold);
      }
      fold.append(node);
    }
  }

  function onTurn(turn) {
    if (!latestTurn || turn.id >= latestTurn.id) latestTurn = turn;
    const section = turnSection(turn.id);
    foldEarlierAttempts(section, turn);
    renderFooter(footerOf(section), turn);
    if (turn.id === latestTurn.id && ACTIVE.has(turn.status)) {
      // Only the latest stopped or failed turn can be retried.
      transcript.querySelectorAll("[data-retry]").forEach((button) => button.remove());
    }
    if (turn.memory_changed) refreshMemory();
    if (!ACTIVE.has(turn.status)) {
      section.querySelectorAll(".msg.is-streaming").forEach((node) => {
        node.classList.remove("is-streaming");
        streams.delete(node.dataset.key);
      });
      if (turn.id === latestTurn.id) announce(section, turn);
      if (seenRunning.delete(turn.id)) callAttention(section, turn);
    } else {
      seenRunning.add(turn.id);
    }
    updateComposer();
    stick();
  }

  // A turn this page saw running ended: a hidden tab says so (a reply, a question,
  // or a tool call waiting for a decision).
  function callAttention(section, turn) {
    const waiting = section.querySelector('[data-kind="question"] form[data-decide]')
      ? "asks you a question"
      : section.querySelector("form[data-decide]")
        ? "needs a decision on a tool call"
        : "";
    let body = "";
    if (waiting) body = `${config.agentName} ${waiting}.`;
    else if (turn.status === "completed") {
      const answer = replyText(section);
      body = answer.length > 140 ? `${answer.slice(0, 140)}…` : answer || "Finished.";
    } else if (turn.status === "failed") body = "The reply failed.";
    else return; // stopped by the person: nothing to tell them
    const title = waiting ? `${config.agentName} is waiting for you` : `${config.agentName} replied`;
    attention.note(title, body, `turn-${turn.id}`);
  }

  // What the agent answered in a turn, as one line of text.
  function replyText(section) {
    return Array.from(section.querySelectorAll(".msg-assistant .md"))
      .map((node) => node.textContent.trim())
      .filter(Boolean)
      .join(" ");
  }

  function announce(section, turn) {
    let text;
    if (turn.status === "completed") {
      const reply = replyText(section);
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

  function onError(frame) {
    if (deciding && ABOUT_DECIDING.has(frame.code)) {
      // The answer to a decision: say it where the person decided.
      const form = deciding;
      deciding = null;
      form.classList.remove("is-deciding");
      if (frame.code !== "already_decided") {
        showFormError(form, frame.message || "That decision was not accepted.");
        return;
      }
    }
    toast(frame.message || "Something went wrong.", frame.code);
    // A refused send (turn_active, approval_pending, too_large, ...): give the text
    // and images back so nothing is lost. Errors about other actions leave sends alone.
    if (!NOT_ABOUT_SENDING.has(frame.code)) {
      const refused = Array.from(pending.entries()).find(([, item]) => item.sent);
      if (refused) {
        const [id, item] = refused;
        pending.delete(id);
        item.el.remove();
        if (!textarea.value.trim()) {
          textarea.value = item.text;
          autosize();
        }
        // Images that went missing upstream cannot be sent again: attach them anew.
        if (frame.code !== "attachment_missing" && !attachments.count) {
          item.images.forEach((image) => attachments.restore(image));
        }
      }
    }
    if (frame.code === "approval_pending") pointAt(frame.approvals);
    updateComposer();
  }

  function showFormError(form, message) {
    const error = form.querySelector("[data-approval-error]");
    if (!error) {
      toast(message);
      return;
    }
    error.textContent = message;
    error.hidden = false;
  }

  function onSynced() {
    synced = true;
    attempt = 0;
    setConnection("", false, "synced");
    // Sends made while offline (or unconfirmed when the socket dropped) go now;
    // their otid makes a repeat harmless.
    pending.forEach((item, id) => {
      item.sent = true;
      transmit(sendFrame(item, id));
    });
    updateComposer();
  }

  function handle(frame) {
    lastFrameAt = Date.now();
    if (frame.type === "delta") quietFor = QUIET_RESYNC; // it streams again
    switch (frame.type) {
      case "message":
        onMessage(frame.message);
        break;
      case "delta":
        onDelta(frame);
        break;
      case "snapshot":
        onSnapshot(frame);
        break;
      case "turn":
        if (!shownAlready(frame.turn)) onTurn(frame.turn);
        break;
      case "approval":
        onApproval(frame.approval);
        break;
      case "retract":
        // Messages the server took back (a crashed attempt it asked again).
        for (const id of frame.ids) {
          document.querySelectorAll(`article.msg[data-id="${Number(id)}"]`).forEach((el) => el.remove());
        }
        break;
      case "synced":
        onSynced();
        break;
      case "error":
        onError(frame);
        break;
      default:
        break;
    }
  }

  // -- the socket

  function setConnection(text, closed, state) {
    connection.textContent = text;
    connection.classList.toggle("is-closed", Boolean(closed));
    // For tests and styling: connecting, synced, reconnecting or closed.
    connection.dataset.state = state || (closed ? "closed" : "reconnecting");
  }

  function transmit(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  function connect() {
    window.clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (closedForGood) return;
    const ws = new WebSocket(socketUrl(config.socket));
    socket = ws;
    synced = false;
    connection.dataset.state = "connecting";
    ws.addEventListener("open", () => {
      ws.send(JSON.stringify({ type: "sync", after: lastId() }));
    });
    ws.addEventListener("message", (event) => {
      const frame = parsedFrame(event);
      if (frame !== undefined) handle(frame);
    });
    ws.addEventListener("close", (event) => {
      if (socket !== ws) return;
      socket = null;
      synced = false;
      if (event.code === 4401) {
        closedForGood = true;
        setConnection("Signed out. Reload the page to sign in again.", true);
      } else if (event.code === 4403) {
        closedForGood = true;
        setConnection("This conversation is not available.", true);
      } else {
        setConnection("Reconnecting…");
        scheduleReconnect();
      }
      updateComposer();
    });
  }

  function scheduleReconnect() {
    if (reconnectTimer || closedForGood) return;
    const base = RECONNECT_DELAYS[Math.min(attempt, RECONNECT_DELAYS.length - 1)];
    attempt += 1;
    reconnectTimer = window.setTimeout(connect, base + Math.random() * base * 0.3);
  }

  function reconnectNow() {
    if (!socket && !closedForGood) {
      attempt = 0;
      connect();
    }
  }

  window.setInterval(() => {
    if (synced && isBusy() && Date.now() - lastFrameAt > quietFor) {
      lastFrameAt = Date.now();
      quietFor = Math.min(quietFor * 2, QUIET_RESYNC_MAX);
      resync();
    }
  }, 1000);

  window.addEventListener("online", reconnectNow);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") reconnectNow();
  });

  // -- the composer

  function updateComposer() {
    const busy = isBusy();
    stopButton.hidden = !busy;
    sendButton.hidden = busy;
    const uploading = attachments.uploading;
    // aria-disabled, not disabled: Tab from the message box still reaches Send (a
    // disabled button is skipped, and focus fell out of the page).
    const cannot = uploading || !(textarea.value.trim() || attachments.count);
    sendButton.setAttribute("aria-disabled", String(cannot));
    attachButton.disabled = attachments.count >= config.images.count;
    tray.hidden = !attachments.count;
  }

  function autosize() {
    if (CSS.supports("field-sizing", "content")) return;
    textarea.style.height = "auto";
    textarea.style.height = `${Math.min(textarea.scrollHeight, window.innerHeight * 0.4)}px`;
  }

  function pendingBubble(text, id, images) {
    const el = element("article", "msg msg-user is-pending is-new");
    el.dataset.otid = id;
    if (images.length) {
      const row = element("div", "msg-images");
      images.forEach((image) => {
        const frame = element("span", "attachment-link");
        const img = element("img", "attachment-thumb");
        img.src = image.url;
        img.alt = image.file.name;
        frame.append(img);
        row.append(frame);
      });
      el.append(row);
    }
    if (text.trim() || !images.length) el.append(element("div", "bubble", text));
    el.append(element("div", "msg-meta"));
    pendingArea.append(el);
    removeEmptyState();
    return el;
  }

  function sendFrame(item, id) {
    const frame = { type: "send", text: item.text, otid: id };
    if (item.images.length) frame.attachments = item.images.map((image) => image.id);
    return frame;
  }

  function send() {
    const text = textarea.value;
    if (!text.trim() && !attachments.count) return;
    if (attachments.uploading) {
      toast("Wait a moment: the images are still uploading.");
      return;
    }
    if (isBusy()) {
      toast("A reply is still in progress. Wait for it, or press Stop.");
      return;
    }
    if (text.length > config.maxChars) {
      toast(
        `That message is too long (${text.length.toLocaleString()} characters; ` +
          `the limit is ${config.maxChars.toLocaleString()}).`,
      );
      return;
    }
    const id = otid();
    const images = attachments.take();
    const item = { text, images, el: pendingBubble(text, id, images), sent: false };
    pending.set(id, item);
    if (synced) item.sent = transmit(sendFrame(item, id));
    textarea.value = "";
    autosize();
    updateComposer();
    stick(true);
  }

  // -- decisions on tool calls and questions, sent over the socket

  function decide(form, submitter) {
    const decision = submitter && submitter.name === "decision" ? submitter.value : "";
    if (!decision) return;
    const error = form.querySelector("[data-approval-error]");
    if (error) error.hidden = true;
    const answer = form.querySelector("[name=answer]");
    const reason = form.querySelector("[name=reason]");
    const frame = { type: "decide", approval: Number(form.dataset.decide), decision };
    if (decision === "answer") {
      if (!answer || !answer.value.trim()) {
        const details = answer && answer.closest("details");
        if (details) details.open = true;
        showFormError(form, "Type the answer first.");
        if (answer) answer.focus();
        return;
      }
      frame.answer = answer.value;
    }
    if (reason && reason.value.trim()) frame.reason = reason.value.trim();
    if (!transmit(frame)) {
      showFormError(form, "Not connected. Decide again once the connection is back.");
      return;
    }
    if (deciding) deciding.classList.remove("is-deciding");
    deciding = form;
    form.classList.add("is-deciding");
  }

  // One decision, with one reason, for every call of a request that still waits: a
  // decide frame per call; the last one sends them all upstream together.
  function decideAll(form, submitter) {
    const decision = submitter && submitter.name === "decision" ? submitter.value : "";
    if (!decision) return;
    const reason = form.querySelector("[name=reason]").value.trim();
    const slot = form.closest(".approval-slot");
    const forms = [...slot.querySelectorAll('[data-kind="approval"] form[data-decide]')];
    for (const each of forms) {
      const frame = { type: "decide", approval: Number(each.dataset.decide), decision };
      if (reason) frame.reason = reason;
      if (!transmit(frame)) {
        toast("Not connected. Decide again once the connection is back.");
        return;
      }
      each.classList.add("is-deciding");
    }
    form.classList.add("is-deciding");
  }

  // -- feedback on the agent's answers

  async function giveFeedback(form, rating) {
    const comment = form.querySelector("[name=comment]");
    const body = new URLSearchParams({ rating, comment: comment ? comment.value : "" });
    form.classList.add("is-saving");
    try {
      const { response, answer } = await postForJson(form.action, body);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      showFeedback(form, answer);
    } catch (error) {
      toast(`Your feedback could not be saved (${error.message}).`);
    } finally {
      form.classList.remove("is-saving");
    }
  }

  function showFeedback(form, saved) {
    form.classList.add("is-rated");
    form.querySelectorAll("button[name=rating]:not([data-feedback-save])").forEach((button) => {
      button.setAttribute("aria-pressed", String(button.value === saved.rating));
    });
    form.querySelector("[data-feedback-save]").value = saved.rating;
    form.querySelector("[data-feedback-status]").textContent =
      saved.rating === "helpful" ? "Marked helpful" : "Marked not helpful";
    const details = form.querySelector(".feedback-comment");
    details.hidden = false;
    details.querySelector("summary").textContent = saved.comment ? "Edit comment" : "Add a comment";
    if (saved.comment) details.open = false;
    const article = form.closest(".msg");
    if (article) article.dataset.feedback = saved.rating;
  }

  transcript.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.matches("form[data-decide]")) {
      event.preventDefault();
      decide(form, event.submitter);
    } else if (form.matches("form[data-decide-all]")) {
      event.preventDefault();
      decideAll(form, event.submitter);
    } else if (form.matches("form[data-feedback]")) {
      event.preventDefault();
      const rating = event.submitter && event.submitter.value;
      if (rating) giveFeedback(form, rating);
    }
  });
  transcript.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.isComposing || event.keyCode === 229) return;
    const field = event.target;
    const decideForm = field.closest && field.closest("form[data-decide]");
    if (decideForm && field.name === "reason") {
      // Enter must not approve by accident: the person picks Approve or Deny.
      event.preventDefault();
    } else if (decideForm && field.name === "answer" && !event.shiftKey) {
      event.preventDefault();
      const button = decideForm.querySelector("button[name=decision][value=answer]");
      if (button) decide(decideForm, button);
    } else if (field.name === "comment" && field.closest("form[data-feedback]")) {
      event.preventDefault();
      const form = field.closest("form[data-feedback]");
      const rating = form.querySelector("[data-feedback-save]").value;
      if (rating) giveFeedback(form, rating);
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

  function stop() {
    if (!isBusy()) return;
    transmit({ type: "stop" });
    const footer = transcript.querySelector(
      `.turn-footer[data-turn="${attr(latestTurn.id)}"] .turn-status`,
    );
    if (footer) footer.textContent = "Stopping…";
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  stopButton.addEventListener("click", stop);
  textarea.addEventListener("input", () => {
    autosize();
    updateComposer();
  });
  textarea.addEventListener("keydown", (event) => {
    // keyCode 229: a key that an input method (IME) is still composing with.
    if (event.isComposing || event.keyCode === 229) return;
    if (event.key === "Enter" && !event.shiftKey && !event.altKey && !event.ctrlKey && !event.metaKey) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.isComposing || event.defaultPrevented) return;
    if (dialog.open) return; // Esc closes the dialog, and does nothing else
    if (menu && menu.open) {
      menu.open = false;
      menu.querySelector("summary").focus();
    } else if (isBusy()) {
      event.preventDefault();
      stop();
    }
  });
  transcript.addEventListener("click", (event) => {
    const retry = event.target.closest("[data-retry]");
    if (!retry) return;
    retry.disabled = true;
    if (!transmit({ type: "retry", turn: Number(retry.dataset.retry) })) {
      retry.disabled = false;
      toast("Not connected. Retry once the connection is back.");
    }
  });

  // -- older messages, a page at a time, as the reader scrolls up

  const olderObserver =
    "IntersectionObserver" in window
      ? new IntersectionObserver(
          (entries) => {
            entries.forEach((entry) => {
              if (entry.isIntersecting) loadOlder(entry.target);
            });
          },
          { root: scroller, rootMargin: "400px 0px 0px 0px" },
        )
      : null;

  function watchOlder() {
    const marker = transcript.querySelector("[data-load-older]");
    if (!marker) return;
    marker.querySelector("button").addEventListener("click", () => loadOlder(marker));
    if (olderObserver) olderObserver.observe(marker);
  }

  async function loadOlder(marker) {
    if (loadingOlder || !marker.isConnected) return;
    loadingOlder = true;
    marker.classList.add("is-loading");
    try {
      const url = `${config.olderUrl}?before=${encodeURIComponent(marker.dataset.before)}`;
      const response = await fetch(url, { credentials: "same-origin" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const fragment = parseHTML(await response.text());
      localTimes(fragment);
      decorateCode(fragment);
      if (olderObserver) olderObserver.unobserve(marker);
      const height = scroller.scrollHeight;
      const top = scroller.scrollTop;
      // A turn can straddle two pages: join its halves into the section on the page.
      const first = transcript.querySelector("section.turn");
      const sections = Array.from(fragment.children).filter((node) => node.matches("section.turn"));
      const last = sections[sections.length - 1];
      if (first && last && last.dataset.turn && last.dataset.turn === first.dataset.turn) {
        first.prepend(...last.querySelectorAll(":scope > .msg"));
        last.remove();
      }
      marker.remove();
      transcript.prepend(fragment);
      scroller.scrollTop = top + (scroller.scrollHeight - height);
      watchOlder();
    } catch (error) {
      marker.classList.remove("is-loading");
      toast(`Older messages could not be loaded (${error.message}).`);
    } finally {
      loadingOlder = false;
    }
  }

  // -- start

  localTimes(document);
  autosize();
  updateComposer();
  stick(true);
  showLinkedMessage();
  watchOlder();
  connect();

  // A search result links to its message (#message-<id>): show it, not the end.
  function showLinkedMessage() {
    const match = /^#message-(\d+)$/.exec(window.location.hash);
    const linked = match && transcript.querySelector(`.msg[data-id="${match[1]}"]`);
    if (!linked) return;
    pinned = false;
    linked.scrollIntoView({ block: "center" });
    linked.classList.add("is-linked");
  }
}
