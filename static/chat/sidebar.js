/* The sidebar: the conversation list (pin, rename in place, delete) and the search
 * as the person types. */

import { attr, element, localTimes, parseHTML, postForJson } from "./dom.js";

// The sidebar's conversations: pin and rename in place (the forms work without
// JavaScript too), by keyboard as by pointer.
export function setupConversationList() {
  // With JavaScript, Rename edits the title in place: the menu's own field is not needed.
  document.documentElement.classList.add("js");
  document.addEventListener("submit", (event) => {
    const pin = event.target.closest("form[data-pin]");
    const rename = event.target.closest("form[data-rename]");
    if (pin) {
      event.preventDefault();
      togglePin(pin);
    } else if (rename) {
      event.preventDefault();
      startRename(rename);
    }
  });
}

// A fresh copy of the list, from the page itself: groups and order as the server has them.
async function refreshConversationList(focusId) {
  const response = await fetch(window.location.href, { headers: { Accept: "text/html" } });
  if (!response.ok) return;
  const fresh = parseHTML(await response.text()).querySelector("[data-conversation-list]");
  const list = document.querySelector("[data-conversation-list]");
  if (!fresh || !list) return;
  // The same element, new content: the search keeps hold of it to hide and show it.
  list.replaceChildren(...fresh.childNodes);
  localTimes(list);
  const item = focusId && list.querySelector(`[data-conversation-item="${attr(focusId)}"]`);
  if (item) item.querySelector(".conversation-link").focus();
}

async function togglePin(form) {
  const item = form.closest("[data-conversation-item]");
  const { response } = await postForJson(form.action, new FormData(form));
  if (response.ok) await refreshConversationList(item && item.dataset.conversationItem);
}

// Rename in place: the title becomes a field; Enter (or leaving it) saves, Escape keeps
// the old title.
function startRename(form) {
  const item = form.closest("[data-conversation-item]");
  const link = item.querySelector(".conversation-link");
  const text = link.querySelector("[data-title-text]");
  item.querySelector("details").open = false;
  const field = element("input", "rename-field");
  field.type = "text";
  field.maxLength = 200;
  field.value = text.textContent;
  field.setAttribute("aria-label", `New title for “${text.textContent}”`);
  link.hidden = true;
  link.before(field);
  field.focus();
  field.select();
  let done = false;

  async function finish(save) {
    if (done) return;
    done = true;
    const title = field.value.trim();
    if (save && title && title !== text.textContent) {
      const body = new FormData(form);
      body.set("title", title);
      const { response, answer } = await postForJson(form.action, body);
      if (response.ok && answer.title) {
        text.textContent = answer.title;
        form.querySelector("input[name=title]").value = answer.title;
        const heading = document.querySelector(`h1[data-conversation-title]`);
        if (link.getAttribute("aria-current") === "page" && heading) {
          heading.textContent = answer.title;
          document.title = `${answer.title} · chatui`;
        }
      }
    }
    field.remove();
    link.hidden = false;
    link.focus();
  }

  field.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      finish(true);
    } else if (event.key === "Escape") {
      event.preventDefault();
      finish(false);
    }
  });
  field.addEventListener("blur", () => finish(true));
}

// The sidebar's search: results as the person types (the server renders them), the
// conversation list again once the field is empty. Enter opens the search page, which
// is also what a browser without JavaScript gets.
export function setupSearch() {
  const form = document.querySelector("[data-search]");
  const results = document.querySelector("[data-search-results]");
  const list = document.querySelector("[data-conversation-list]");
  if (!form || !results || !list) return;
  const input = form.querySelector("[data-search-input]");
  let timer = null;
  let asked = 0;

  function showList() {
    results.hidden = true;
    results.replaceChildren();
    list.hidden = false;
  }

  async function find() {
    const query = input.value.trim();
    const mine = ++asked;
    if (!query) {
      showList();
      return;
    }
    const url = `${form.action}?${new URLSearchParams({ q: query, partial: "1" })}`;
    try {
      const response = await fetch(url, { headers: { Accept: "text/html" } });
      if (mine !== asked) return; // a newer search answers instead
      if (!response.ok) throw new Error(String(response.status));
      results.replaceChildren(parseHTML(await response.text()));
      localTimes(results);
    } catch (error) {
      if (mine !== asked) return;
      results.replaceChildren(element("p", "search-summary", "Search is not available right now."));
    }
    list.hidden = true;
    results.hidden = false;
  }

  input.addEventListener("input", () => {
    window.clearTimeout(timer);
    timer = window.setTimeout(find, 150);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && input.value) {
      event.preventDefault();
      input.value = "";
      asked++;
      showList();
    } else if (event.key === "ArrowDown") {
      const first = results.querySelector("[data-search-hit]");
      if (first && !results.hidden) {
        event.preventDefault();
        first.focus();
      }
    }
  });
  results.addEventListener("keydown", (event) => {
    const hits = Array.from(results.querySelectorAll("[data-search-hit]"));
    const at = hits.indexOf(document.activeElement);
    if (at < 0) return;
    if (event.key === "ArrowDown" && at + 1 < hits.length) hits[at + 1].focus();
    else if (event.key === "ArrowUp") (at > 0 ? hits[at - 1] : input).focus();
    else if (event.key === "Escape") input.focus();
    else return;
    event.preventDefault();
  });
  if (input.value.trim()) find();
}
