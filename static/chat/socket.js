/* The conversation's websocket and its sync (see "The websocket protocol" in
 * README.md). On open it asks for everything after the newest message the page has;
 * until `synced` comes back, the page is catching up. It reconnects with growing
 * delays, at once when the browser is back online or the tab visible again, and not
 * at all once the server said the page may not have this conversation (4401, 4403).
 * It syncs again when a frame went missing (`resync()`) or a running turn has been
 * quiet too long: a worker under load may drop frames, and a turn may have ended in
 * a frame that never came. */

import { RECONNECT_DELAYS, parsedFrame, socketUrl } from "./dom.js";

// How long a running turn may stay quiet before the page syncs again (ms), at first
// and at most. Each quiet sync doubles the wait, so a busy server is not asked again
// and again.
const QUIET_RESYNC = 5000;
const QUIET_RESYNC_MAX = 60000;

// `lastId()`: the newest stored message shown; `busy()`: whether a turn runs;
// `received(frame)`: every frame; `changed()`: connected or not any more.
export function ConversationSocket({ url, lastId, busy, received, changed }) {
  const connection = document.querySelector("[data-connection]");
  let socket = null;
  let synced = false;
  let lastFrameAt = Date.now();
  let quietFor = QUIET_RESYNC;
  let attempt = 0;
  let reconnectTimer = null;
  let closedForGood = false;

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

  // Sync again; the answer fills the gap, and a turn that ended meanwhile comes in
  // its final state. While a sync is under way its snapshot will fill the gap.
  function resync() {
    if (synced && transmit({ type: "sync", after: lastId() })) synced = false;
  }

  function handle(frame) {
    lastFrameAt = Date.now();
    if (frame.type === "delta") quietFor = QUIET_RESYNC; // it streams again
    if (frame.type === "synced") {
      synced = true;
      attempt = 0;
      setConnection("", false, "synced");
    }
    received(frame);
  }

  function connect() {
    window.clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (closedForGood) return;
    const ws = new WebSocket(socketUrl(url));
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
      changed();
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

  function start() {
    window.setInterval(() => {
      if (synced && busy() && Date.now() - lastFrameAt > quietFor) {
        lastFrameAt = Date.now();
        quietFor = Math.min(quietFor * 2, QUIET_RESYNC_MAX);
        resync();
      }
    }, 1000);
    window.addEventListener("online", reconnectNow);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") reconnectNow();
    });
    connect();
  }

  return {
    transmit,
    resync,
    start,
    get synced() {
      return synced;
    },
  };
}
