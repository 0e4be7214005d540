/* Small helpers every part of the page uses: building and reading the DOM, the CSRF
 * token, posting a form for JSON, copying, code blocks, local times. */

export const RECONNECT_DELAYS = [500, 1000, 2000, 4000, 8000, 15000];

// ---- small DOM helpers ------------------------------------------------------

export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function parseHTML(html) {
  const template = document.createElement("template");
  template.innerHTML = html;
  return template.content;
}

export function attr(value) {
  return CSS.escape(String(value));
}

export function csrfToken() {
  const input = document.querySelector("input[name=csrfmiddlewaretoken]");
  if (input && input.value) return input.value;
  const cookie = document.cookie.split("; ").find((item) => item.startsWith("csrftoken="));
  return cookie ? decodeURIComponent(cookie.slice("csrftoken=".length)) : "";
}

// Data posted as the page's own request (CSRF header), answered in JSON: the response
// and its JSON body ({} when it is not JSON).
export async function postForJson(url, body) {
  const response = await fetch(url, {
    method: "POST",
    body,
    credentials: "same-origin",
    headers: { "X-CSRFToken": csrfToken(), Accept: "application/json" },
  });
  const answer = await response.json().catch(() => ({}));
  return { response, answer };
}

// -- copying: a message as its markdown, a code block as its code --------------------

const COPY_ICON =
  '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="9" y="9" width="11" height="11" rx="2"/><path d="M5 15V6a2 2 0 0 1 2-2h9"/></svg>';

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain HTTP on another host has no Clipboard API: the old way, from a hidden field.
  const field = element("textarea", "visually-hidden");
  field.value = text;
  document.body.append(field);
  field.select();
  const done = document.execCommand("copy");
  field.remove();
  if (!done) throw new Error("the browser refused");
}

function copied(button, ok) {
  const label = button.querySelector(".copy-label");
  const before = label ? label.textContent : "";
  if (label) label.textContent = ok ? "Copied" : "Not copied";
  button.classList.add(ok ? "is-copied" : "is-not-copied");
  const announcer = document.querySelector("[data-announcer]");
  if (announcer) announcer.textContent = ok ? "Copied to the clipboard." : "Could not copy.";
  window.setTimeout(() => {
    if (label) label.textContent = before;
    button.classList.remove("is-copied", "is-not-copied");
  }, 2000);
}

export function setupCopy() {
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-copy-message], [data-copy-code]");
    if (!button) return;
    event.preventDefault();
    let text = "";
    if (button.matches("[data-copy-code]")) {
      const code = button.closest(".code-block").querySelector("pre code, pre");
      text = code ? code.textContent : "";
    } else {
      const source = button.closest(".msg").querySelector("template[data-copy-source]");
      text = source ? source.content.textContent : "";
    }
    try {
      await copyText(text);
      copied(button, true);
    } catch (error) {
      copied(button, false);
    }
  });
}

// Every code block of a finished answer gets a head: its language, and Copy.
export function decorateCode(root) {
  root.querySelectorAll(".msg:not(.is-streaming) .md pre").forEach((pre) => {
    if (pre.parentElement.classList.contains("code-block")) return;
    const block = element("div", "code-block");
    const head = element("div", "code-head");
    const code = pre.querySelector("code[class*='language-']");
    const language = code ? code.className.match(/language-([\w+#.-]+)/) : null;
    head.append(element("span", "code-lang", language ? language[1] : "code"));
    const button = element("button", "copy-button");
    button.type = "button";
    button.dataset.copyCode = "";
    button.setAttribute("aria-label", `Copy the ${language ? language[1] : ""} code`.replace("  ", " "));
    button.innerHTML = COPY_ICON;
    button.append(element("span", "copy-label", "Copy"));
    head.append(button);
    pre.before(block);
    block.append(head, pre);
  });
}

export function socketUrl(path) {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}${path}`;
}

export function megabytes(bytes) {
  return `${Math.round((bytes / (1024 * 1024)) * 10) / 10} MB`;
}

// ---- every page: local times, the drawer, confirmations --------------------

export function localTimes(root) {
  const today = new Date().toDateString();
  const selector = ".msg-meta time[datetime], time.turn-time[datetime], time[data-local][datetime]";
  root.querySelectorAll(selector).forEach((node) => {
    const when = new Date(node.getAttribute("datetime"));
    if (Number.isNaN(when.getTime())) return;
    const clock = when.toLocaleTimeString([], { hour: "numeric", minute: "2-digit" });
    node.textContent =
      when.toDateString() === today
        ? clock
        : `${when.toLocaleDateString([], { month: "short", day: "numeric" })}, ${clock}`;
    node.title = node.title || when.toLocaleString();
  });
}

// A socket message's JSON, or undefined when it is not JSON (ignored, as the server
// never sends such a frame).
export function parsedFrame(event) {
  try {
    return JSON.parse(event.data);
  } catch {
    return undefined;
  }
}

// A key that an input method (IME) is still composing with (keyCode 229 where the
// browser does not say isComposing): it is not the person pressing Enter yet.
export function composing(event) {
  return event.isComposing || event.keyCode === 229;
}
