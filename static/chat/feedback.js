/* Feedback on the agent's answers: Helpful or Not helpful, and a comment, saved with
 * a form post (the form works without this script too). */

import { composing, postForJson } from "./dom.js";

export function Feedback({ transcript, toast }) {
  async function give(form, rating) {
    const comment = form.querySelector("[name=comment]");
    const body = new URLSearchParams({ rating, comment: comment ? comment.value : "" });
    form.classList.add("is-saving");
    try {
      const { response, answer } = await postForJson(form.action, body);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      show(form, answer);
    } catch (error) {
      toast(`Your feedback could not be saved (${error.message}).`);
    } finally {
      form.classList.remove("is-saving");
    }
  }

  function show(form, saved) {
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
    if (!form.matches("form[data-feedback]")) return;
    event.preventDefault();
    const rating = event.submitter && event.submitter.value;
    if (rating) give(form, rating);
  });
  transcript.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || composing(event)) return;
    const field = event.target;
    const form = field.name === "comment" && field.closest && field.closest("form[data-feedback]");
    if (!form) return;
    event.preventDefault();
    const rating = form.querySelector("[data-feedback-save]").value;
    if (rating) give(form, rating);
  });
}
