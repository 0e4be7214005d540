/* chatui in the browser, the entry module: the drawer, local times and the approvals
 * count on every page (page.js, dom.js); the sidebar (sidebar.js); the live approval
 * console (approvals.js); and on a conversation page the live socket (see "The
 * websocket protocol" in README.md), decisions, images and feedback (conversation.js).
 * ES modules, served as they are: no bundler.
 *
 * Server-rendered HTML is the source of truth: stored messages arrive as HTML the
 * server rendered with the same template as the page. Only text that is still
 * streaming is rendered here, as markdown through markdown-it (html: false) and then
 * DOMPurify, or as plain text (tool arguments). No inline scripts or styles, so the
 * page works under a strict Content-Security-Policy.
 */

import { decorateCode, localTimes, setupCopy } from "./dom.js";
import { setupConfirms, setupDrawer, setupFlash, setupNotifyButton } from "./page.js";
import { ApprovalsFeed } from "./approvals.js";
import { Conversation } from "./conversation.js";
import { setupConversationList, setupSearch } from "./sidebar.js";

document.addEventListener("DOMContentLoaded", () => {
  setupFlash();
  setupCopy();
  decorateCode(document);
  setupDrawer();
  setupConfirms();
  setupSearch();
  setupConversationList();
  setupNotifyButton();
  ApprovalsFeed();
  const data = document.getElementById("chat-config");
  if (data) Conversation(JSON.parse(data.textContent));
  else localTimes(document);
});
