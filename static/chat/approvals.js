/* The approval console and the navigation's pending count, kept live over
 * ws/approvals/ (see "The websocket protocol" in README.md). */

import { RECONNECT_DELAYS, attr, csrfToken, element, localTimes, parseHTML, parsedFrame, postForJson, socketUrl } from "./dom.js";
import { attention } from "./page.js";

export function ApprovalsFeed() {
  const counts = document.querySelectorAll("[data-pending-count]");
  const consolePage = document.querySelector("[data-console]");
  if (!counts.length && !consolePage) return;
  const list = consolePage && consolePage.querySelector("[data-approval-list]");
  const empty = consolePage && consolePage.querySelector("[data-console-empty]");
  const heading = document.querySelector("[data-console-count]");
  let attempt = 0;

  function setCount(pending) {
    counts.forEach((node) => {
      const changed = node.textContent !== String(pending);
      node.textContent = String(pending);
      node.hidden = !pending;
      if (changed && pending) {
        node.classList.remove("is-bumped");
        void node.offsetWidth; // restart the animation
        node.classList.add("is-bumped");
      }
    });
    if (heading) {
      heading.textContent = pending ? `${pending} waiting for a decision` : "Nothing is waiting";
    }
  }

  // Cards that arrive live were rendered without this page's CSRF token.
  function arm(card) {
    card.querySelectorAll("form[method=post]").forEach((form) => {
      if (form.querySelector("input[name=csrfmiddlewaretoken]")) return;
      const token = element("input");
      token.type = "hidden";
      token.name = "csrfmiddlewaretoken";
      token.value = consolePage.dataset.csrf || csrfToken();
      form.prepend(token);
    });
    localTimes(card);
  }

  function added(frame) {
    if (!list || list.querySelector(`[data-approval-card="${attr(frame.id)}"]`)) return;
    const card = parseHTML(frame.html).firstElementChild;
    if (!card) return;
    arm(card);
    card.classList.add("is-new");
    // A parallel call of a request already shown: its context is up there once.
    const request = card.dataset.request;
    if (request && list.querySelector(`[data-request="${attr(request)}"]`)) {
      const context = card.querySelector(".approval-context");
      if (context) context.replaceWith(element("p", "approval-sibling", "Another call of the request above."));
    }
    list.prepend(card);
    if (empty) empty.hidden = true;
    const where = card.querySelector(".approval-card-title a, .approval-card-title span");
    attention.note(
      "A tool call waits for a decision",
      where ? `In “${where.textContent.trim()}”` : "In the approval console",
      `approval-${frame.id}`,
    );
  }

  // A decided card keeps the tool and its arguments; the form gives way to the
  // record of who decided what, when and why.
  function showDecided(card, html) {
    const record = parseHTML(html).firstElementChild;
    const slot = card.querySelector(".approval-slot");
    if (!record || !slot) return;
    localTimes(record);
    slot.replaceChildren(record);
    card.classList.add("is-decided");
  }

  function decided(frame) {
    const card = list && list.querySelector(`[data-approval-card="${attr(frame.id)}"]`);
    if (!card || card.classList.contains("is-decided")) return;
    showDecided(card, frame.html);
  }

  // Deciding in the console: posted in the background, the card updated in place.
  async function decideInPlace(form, submitter) {
    const card = form.closest("[data-approval-card]");
    const body = new URLSearchParams(new FormData(form, submitter));
    const error = form.querySelector("[data-approval-error]");
    if (error) error.hidden = true;
    form.classList.add("is-deciding");
    try {
      const { response, answer } = await postForJson(form.action, body);
      if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
      if (card) showDecided(card, answer.html);
    } catch (problem) {
      if (error) {
        error.textContent = problem.message;
        error.hidden = false;
      }
    } finally {
      form.classList.remove("is-deciding");
    }
  }

  if (list) {
    list.addEventListener("submit", (event) => {
      const form = event.target.closest("form[data-decide]");
      if (!form) return;
      event.preventDefault();
      decideInPlace(form, event.submitter);
    });
  }

  if (consolePage) consolePage.querySelectorAll("[data-approval-card]").forEach(arm);

  function connect() {
    const ws = new WebSocket(socketUrl("/ws/approvals/"));
    ws.addEventListener("open", () => {
      attempt = 0;
    });
    ws.addEventListener("message", (event) => {
      const frame = parsedFrame(event);
      if (frame === undefined) return;
      if (frame.type === "approval.count") setCount(frame.pending);
      else if (frame.type === "approval.added") added(frame);
      else if (frame.type === "approval.decided") decided(frame);
    });
    ws.addEventListener("close", (event) => {
      if (event.code === 4401) return;
      const delay = RECONNECT_DELAYS[Math.min(attempt, RECONNECT_DELAYS.length - 1)];
      attempt += 1;
      window.setTimeout(connect, delay + Math.random() * delay * 0.3);
    });
  }
  connect();
}

// ---- markdown for text that is still streaming -----------------------------
