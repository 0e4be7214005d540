/* What every page has: the drawer, confirmations, flash messages, and the tab's
 * attention (a count in the title and, when allowed, notifications) for things that
 * happen while it is in the background. */

import { element } from "./dom.js";

export const CLOSE_ICON = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M6 6l12 12M18 6L6 18"/></svg>';

export function setupDrawer() {
  const app = document.querySelector("[data-app]");
  if (!app) return;
  const toggles = document.querySelectorAll("[data-drawer-toggle]");
  const backdrop = app.querySelector(".backdrop");
  const sidebar = document.getElementById("sidebar");

  function set(open) {
    app.classList.toggle("drawer-open", open);
    if (backdrop) backdrop.hidden = !open;
    toggles.forEach((button) => button.setAttribute("aria-expanded", String(open)));
    if (open) {
      const current = sidebar.querySelector(".is-current") || sidebar.querySelector("a");
      if (current) current.focus();
    }
  }
  toggles.forEach((button) =>
    button.addEventListener("click", () => set(!app.classList.contains("drawer-open"))),
  );
  app.querySelectorAll("[data-drawer-close]").forEach((node) =>
    node.addEventListener("click", () => set(false)),
  );
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || !app.classList.contains("drawer-open")) return;
    // Handled: Esc closes the drawer and does nothing else (it also stops replies).
    event.preventDefault();
    set(false);
    if (toggles[0]) toggles[0].focus();
  });
}

export function setupConfirms() {
  document.addEventListener("submit", (event) => {
    const form = event.target.closest("form[data-confirm]");
    if (form && !window.confirm(form.dataset.confirm)) event.preventDefault();
  });
}

// ---- a tab nobody watches: what happened shows in its title and, if the person
// allowed them, as a browser notification ------------------------------------------

export const attention = (() => {
  let unseen = 0;
  const bare = (title) => title.replace(/^\(\d+\) /, "");
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && unseen) {
      unseen = 0;
      document.title = bare(document.title);
    }
  });
  return {
    // Only while the tab is hidden: someone looking at the page sees it happen.
    note(title, body, tag) {
      if (!document.hidden) return;
      unseen += 1;
      document.title = `(${unseen}) ${bare(document.title)}`;
      if (!("Notification" in window) || Notification.permission !== "granted") return;
      try {
        const note = new Notification(title, { body, tag });
        note.addEventListener("click", () => {
          window.focus();
          note.close();
        });
      } catch {
        // A browser that only notifies through a service worker: the title says it.
      }
    },
  };
})();

// The sidebar's "Notify me" asks for the permission (a browser only asks on a click).
export function setupNotifyButton() {
  const button = document.querySelector("[data-notify]");
  if (!button || !("Notification" in window)) return;
  const state = () => {
    const permission = Notification.permission;
    button.hidden = permission === "granted";
    button.disabled = permission === "denied";
    button.textContent =
      permission === "denied" ? "Notifications are blocked" : "Notify me in other tabs";
  };
  button.addEventListener("click", async () => {
    await Notification.requestPermission();
    state();
  });
  state();
}

// ---- every page with the Approvals entry: the live count, and the console ----

// Flash messages from the server: a confirmation goes by itself after a few seconds,
// an error stays until dismissed.
export function setupFlash() {
  document.querySelectorAll(".flash p").forEach((note) => {
    note.append(dismissButton(note, "icon-button flash-close"));
    if (!note.classList.contains("flash-error")) window.setTimeout(() => note.remove(), 5000);
  });
}

// A button that takes `note` (a flash message, a toast) off the page.
export function dismissButton(note, className = "icon-button") {
  const close = element("button", className);
  close.type = "button";
  close.setAttribute("aria-label", "Dismiss");
  close.innerHTML = CLOSE_ICON;
  close.addEventListener("click", () => note.remove());
  return close;
}
