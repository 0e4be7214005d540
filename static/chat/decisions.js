/* Tool calls and questions that wait for a person, in the chat: the forms the server
 * rendered (chat/_approval.html) send their decision over the conversation's socket,
 * one `decide` frame per call; the answer comes back as an `approval` frame (the form
 * replaced by the decision, on every page that shows it) or as an error, shown where
 * the person decided. The shared approval console is approvals.js. */

import { attr, composing, localTimes, parseHTML } from "./dom.js";

// Error codes that answer a decision sent from an approval form.
const ABOUT_DECIDING = new Set(["not_found", "forbidden", "already_decided", "bad_frame", "turn_active"]);

// `transmit(frame)`: send over the socket, false when not connected.
export function Decisions({ transcript, transmit, toast }) {
  const toasts = document.querySelector("[data-toasts]");
  // The form whose decision went out and awaits an answer.
  let deciding = null;

  function showFormError(form, message) {
    const error = form.querySelector("[data-approval-error]");
    if (!error) {
      toast(message);
      return;
    }
    error.textContent = message;
    error.hidden = false;
  }

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

  // A request decided (here, in another tab, or in the console): show the decision.
  function update(approval) {
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

  // An error frame: when it answers the decision just sent, it is shown in that form
  // and true is returned (already_decided is shown as a toast too, and the form goes
  // when its `approval` frame comes).
  function answered(frame) {
    if (!deciding || !ABOUT_DECIDING.has(frame.code)) return false;
    const form = deciding;
    deciding = null;
    form.classList.remove("is-deciding");
    if (frame.code === "already_decided") return false;
    showFormError(form, frame.message || "That decision was not accepted.");
    return true;
  }

  // A send was refused because these requests wait: bring the first into view.
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

  // What a turn's section waits for, in words for a notification, or "".
  function waitingIn(section) {
    if (section.querySelector('[data-kind="question"] form[data-decide]')) return "asks you a question";
    if (section.querySelector("form[data-decide]")) return "needs a decision on a tool call";
    return "";
  }

  transcript.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.matches("form[data-decide]")) {
      event.preventDefault();
      decide(form, event.submitter);
    } else if (form.matches("form[data-decide-all]")) {
      event.preventDefault();
      decideAll(form, event.submitter);
    }
  });
  transcript.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || composing(event)) return;
    const field = event.target;
    const form = field.closest && field.closest("form[data-decide]");
    if (!form) return;
    if (field.name === "reason") {
      // Enter must not approve by accident: the person picks Approve or Deny.
      event.preventDefault();
    } else if (field.name === "answer" && !event.shiftKey) {
      event.preventDefault();
      const button = form.querySelector("button[name=decision][value=answer]");
      if (button) decide(form, button);
    }
  });

  return { update, answered, pointAt, waitingIn };
}
