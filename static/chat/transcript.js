/* What the conversation page shows: the transcript. Stored messages arrive as HTML
 * the server rendered (chat/_message.html); text that is still streaming is rendered
 * here, shaped like that template, as markdown through markdown-it (html: false) and
 * DOMPurify, and tool arguments as plain text. Also: each turn's footer, scrolling
 * that stays at the bottom only while the reader is there, older messages a page at a
 * time, and the message a search result links to. */

import { attr, decorateCode, element, localTimes, parseHTML } from "./dom.js";

export const ACTIVE = new Set(["queued", "running"]);
const TOOL_KINDS = new Set(["tool_call", "approval_request"]);

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

// `gap()`: a delta starts beyond the text shown, so a frame went missing on the way.
export function Transcript({ config, toast, gap }) {
  const transcript = document.querySelector("[data-transcript]");
  const scroller = document.querySelector("[data-transcript-scroll]");
  const pendingArea = document.querySelector("[data-pending]");
  const jumpButton = document.querySelector("[data-jump]");
  const renderMarkdown = markdownRenderer();
  const members = config.members || [];

  // key -> {el, kind, turn, text, body, calls: Map(tool_call_id -> {text, name, nameNode, pre})}
  const streams = new Map();
  let pinned = true;
  let renderQueued = false;
  let loadingOlder = false;

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

  // A message the person sent that the server has not confirmed yet.
  function addPending(el) {
    pendingArea.append(el);
    removeEmptyState();
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

  function nameCall(call, name) {
    if (name && !call.name) {
      call.name = name;
      call.nameNode.textContent = name;
    }
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

  // A stored message. `confirmed(otid)` takes the person's "Sending…" bubble away and
  // says whether there was one. Returns the message's element when it is new here.
  function message(stored, confirmed) {
    const node = parseHTML(stored.html).firstElementChild;
    if (!node) return null;
    localTimes(node);
    decorateCode(node);
    const shown = transcript.querySelector(`.msg[data-id="${attr(stored.id)}"]`);
    if (shown) {
      // A stored message brought up to date (after a Stop, Letta may send one last
      // piece): show what is stored now, as a reload would.
      if (shown.outerHTML !== node.outerHTML) shown.replaceWith(node);
      return null;
    }
    const wasPending = Boolean(node.dataset.otid) && confirmed(node.dataset.otid);
    const streaming = streamingElement(stored.key);
    if (streaming) {
      // Someone who opened the reasoning while it streamed keeps it open.
      const details = streaming.querySelector("details[data-touched]");
      const kept = node.querySelector("details");
      if (details && kept) kept.open = details.open;
      streaming.replaceWith(node);
    } else {
      // A confirmed send takes its "Sending…" bubble's place without fading in again.
      if (!wasPending) node.classList.add("is-new");
      insertStored(stored.turn, node);
    }
    streams.delete(stored.key);
    stick();
    return node;
  }

  function delta(frame) {
    for (const piece of frame.deltas) {
      if (storedElement(piece.key)) continue;
      let stream = streams.get(piece.key);
      if (!stream) {
        // Joined mid-message: wait for the snapshot rather than show a fragment.
        if (piece.offset > 0) {
          gap();
          continue;
        }
        const sender = TOOL_KINDS.has(piece.kind) ? "" : piece.sender || "";
        stream = createStream(piece.key, piece.kind, frame.turn, sender);
      }
      if (piece.field === "arguments") {
        const callId = piece.tool_call_id || "";
        let call = stream.calls.get(callId);
        if (!call) {
          if (piece.offset > 0) {
            gap();
            continue;
          }
          call = addCall(stream, callId, piece.name);
        }
        nameCall(call, piece.name);
        if (piece.offset > call.text.length) {
          gap();
          continue;
        }
        call.text += piece.text.slice(call.text.length - piece.offset);
        call.pre.textContent = call.text;
        stick();
      } else {
        if (piece.offset > stream.text.length) {
          gap();
          continue;
        }
        stream.text += piece.text.slice(stream.text.length - piece.offset);
        scheduleRender(stream);
      }
    }
  }

  // What a running turn has streamed so far (its turn is shown first, by the caller).
  function snapshot(frame) {
    const turnId = frame.turn ? frame.turn.id : null;
    for (const open of frame.open) {
      if (storedElement(open.key)) continue;
      const stream =
        streams.get(open.key) || createStream(open.key, open.kind, turnId, open.sender);
      if (TOOL_KINDS.has(open.kind)) {
        for (const tool of open.tool_calls) {
          const callId = tool.tool_call_id || "";
          const call = stream.calls.get(callId) || addCall(stream, callId, tool.name);
          nameCall(call, tool.name);
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

  // Messages the server took back (a crashed attempt it asked again).
  function retract(ids) {
    for (const id of ids) {
      document.querySelectorAll(`article.msg[data-id="${Number(id)}"]`).forEach((el) => el.remove());
    }
  }

  // -- turns

  // A sync sends the latest turn even when it ended long ago: a footer that already
  // shows that ending stays as it is.
  function shownAlready(turn) {
    if (ACTIVE.has(turn.status) || turn.stopping) return false;
    const footer = transcript.querySelector(`.turn-footer[data-turn="${attr(turn.id)}"]`);
    return Boolean(footer && footer.dataset.status === turn.status);
  }

  // `latest`: the newest turn of the conversation, the only one Retry is offered for.
  function turn(shown, latest) {
    const section = turnSection(shown.id);
    foldEarlierAttempts(section, shown);
    renderFooter(footerOf(section), shown, latest);
    if (latest && ACTIVE.has(shown.status)) {
      // Only the latest stopped or failed turn can be retried.
      transcript.querySelectorAll("[data-retry]").forEach((button) => button.remove());
    }
    if (!ACTIVE.has(shown.status)) {
      section.querySelectorAll(".msg.is-streaming").forEach((node) => {
        node.classList.remove("is-streaming");
        streams.delete(node.dataset.key);
      });
    }
    stick();
    return section;
  }

  function renderFooter(footer, turn, latest) {
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
    if (turn.retryable && latest) {
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

  function statusOf(turnId) {
    return transcript.querySelector(`.turn-footer[data-turn="${attr(turnId)}"] .turn-status`);
  }

  // What the agent answered in a turn, as one line of text.
  function replyText(section) {
    return Array.from(section.querySelectorAll(".msg-assistant .md"))
      .map((node) => node.textContent.trim())
      .filter(Boolean)
      .join(" ");
  }

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

  // A search result links to its message (#message-<id>): show it, not the end.
  function showLinkedMessage() {
    const match = /^#message-(\d+)$/.exec(window.location.hash);
    const linked = match && transcript.querySelector(`.msg[data-id="${match[1]}"]`);
    if (!linked) return;
    pinned = false;
    linked.scrollIntoView({ block: "center" });
    linked.classList.add("is-linked");
  }

  function start() {
    stick(true);
    showLinkedMessage();
    watchOlder();
  }

  return {
    element: transcript,
    lastId,
    stick,
    addPending,
    message,
    delta,
    snapshot,
    retract,
    shownAlready,
    turn,
    statusOf,
    replyText,
    start,
  };
}
