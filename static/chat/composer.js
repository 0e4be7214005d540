/* The composer: the message box, its images (attachments.js), Send and Stop. A sent
 * message shows at once as a "Sending…" bubble under an otid of its own; it goes
 * over the socket when the page is in sync (else once it is: the otid makes a repeat
 * harmless) and gives way to the stored message when the server confirms it. A send
 * the server refuses gives its text and images back. */

import { Attachments } from "./attachments.js";
import { composing, element } from "./dom.js";

// Error codes answering a stop, retry or decision, never a send.
const NOT_ABOUT_SENDING = new Set([
  "not_retryable",
  "not_found",
  "forbidden",
  "already_decided",
  "unknown_type",
]);

function otid() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  // crypto.randomUUID needs a secure context; getRandomValues does not.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function sendFrame(item, id) {
  const frame = { type: "send", text: item.text, otid: id };
  if (item.images.length) frame.attachments = item.images.map((image) => image.id);
  return frame;
}

// `socket`: transmit(frame) and synced; `busy()`: whether a turn runs; `stop()`: ask
// the running turn to stop; `view`: the transcript (where bubbles go, scrolling).
export function Composer({ config, socket, busy, stop, view, toast }) {
  const form = document.querySelector("[data-composer]");
  const textarea = document.querySelector("[data-composer-text]");
  const sendButton = document.querySelector("[data-send]");
  const stopButton = document.querySelector("[data-stop]");
  const tray = document.querySelector("[data-attachments]");
  const attachButton = document.querySelector("[data-attach]");
  // otid -> {text, images, el, sent}
  const pending = new Map();
  // Images attached in the composer, uploading at once.
  const attachments = Attachments({
    limits: config.images,
    uploadUrl: config.uploadUrl,
    tray,
    attachButton,
    fileInput: document.querySelector("[data-attach-input]"),
    textarea,
    main: document.querySelector(".main"),
    dropZone: document.querySelector("[data-drop-zone]"),
    toast,
    changed: update,
  });

  function update() {
    const running = busy();
    stopButton.hidden = !running;
    sendButton.hidden = running;
    // aria-disabled, not disabled: Tab from the message box still reaches Send (a
    // disabled button is skipped, and focus fell out of the page).
    const cannot = attachments.uploading || !(textarea.value.trim() || attachments.count);
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
    view.addPending(el);
    return el;
  }

  function send() {
    const text = textarea.value;
    if (!text.trim() && !attachments.count) return;
    if (attachments.uploading) {
      toast("Wait a moment: the images are still uploading.");
      return;
    }
    if (busy()) {
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
    if (socket.synced) item.sent = socket.transmit(sendFrame(item, id));
    textarea.value = "";
    autosize();
    update();
    view.stick(true);
  }

  // The server stored the message sent under `id`: its bubble goes; true if it was ours.
  function confirm(id) {
    const item = pending.get(id);
    if (!item) return false;
    item.el.remove();
    pending.delete(id);
    return true;
  }

  // The page is in sync: sends made while offline (or unconfirmed when the socket
  // dropped) go now; their otid makes a repeat harmless.
  function flush() {
    pending.forEach((item, id) => {
      item.sent = true;
      socket.transmit(sendFrame(item, id));
    });
    update();
  }

  // An error frame: a refused send (turn_active, approval_pending, too_large, ...)
  // gives the text and images back so nothing is lost. Errors about other actions
  // leave sends alone.
  function refused(frame) {
    if (NOT_ABOUT_SENDING.has(frame.code)) return;
    const sent = Array.from(pending.entries()).find(([, item]) => item.sent);
    if (!sent) return;
    const [id, item] = sent;
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

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  stopButton.addEventListener("click", stop);
  textarea.addEventListener("input", () => {
    autosize();
    update();
  });
  textarea.addEventListener("keydown", (event) => {
    if (composing(event)) return;
    if (event.key === "Enter" && !event.shiftKey && !event.altKey && !event.ctrlKey && !event.metaKey) {
      event.preventDefault();
      send();
    }
  });
  autosize();

  return { update, confirm, flush, refused };
}
