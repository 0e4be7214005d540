/* Images attached in the composer: by button, paste or drop. Each uploads at once to
 * the conversation's attachment URL; the send frame names their ids. */

import { element, megabytes, postForJson } from "./dom.js";
import { CLOSE_ICON } from "./page.js";

export function Attachments({
  limits,
  uploadUrl,
  tray,
  attachButton,
  fileInput,
  textarea,
  main,
  dropZone,
  toast,
  changed,
}) {
  // {id, file, url, el, uploading}, in the order the person picked them.
  let attached = [];

  function chipFor(image) {
    const chip = element("div", "attachment-chip");
    const img = element("img");
    img.src = image.url;
    img.alt = image.file.name;
    const remove = element("button", "attachment-remove");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove ${image.file.name}`);
    remove.title = "Remove";
    remove.innerHTML = CLOSE_ICON;
    remove.addEventListener("click", () => {
      drop(image);
      textarea.focus();
    });
    chip.append(img, remove);
    return chip;
  }

  function drop(image) {
    attached = attached.filter((item) => item !== image);
    image.el.remove();
    image.dropped = true;
    changed();
  }

  function restore(image) {
    image.el = chipFor(image);
    attached.push(image);
    tray.append(image.el);
    changed();
  }

  function addFiles(files) {
    const images = Array.from(files || []).filter((file) => file.type.startsWith("image/"));
    if (files && files.length && !images.length) {
      toast("Only images can be attached (PNG, JPEG, GIF or WebP).");
      return;
    }
    for (const file of images) {
      if (attached.length >= limits.count) {
        toast(`Attach at most ${limits.count} images to one message.`);
        break;
      }
      if (file.size > limits.bytes) {
        toast(`${file.name} is larger than ${megabytes(limits.bytes)}; it was not attached.`);
        continue;
      }
      const image = { id: null, file, url: URL.createObjectURL(file), uploading: true };
      image.el = chipFor(image);
      image.el.classList.add("is-uploading");
      attached.push(image);
      tray.append(image.el);
      upload(image);
    }
    changed();
  }

  async function upload(image) {
    const body = new FormData();
    body.append("file", image.file, image.file.name);
    let problem = "";
    try {
      const { response, answer } = await postForJson(uploadUrl, body);
      if (response.status === 201 && answer.id) image.id = answer.id;
      else problem = answer.error || `${image.file.name} could not be attached (HTTP ${response.status}).`;
    } catch (error) {
      problem = `${image.file.name} could not be uploaded: the connection failed.`;
    }
    image.uploading = false;
    if (image.dropped) return;
    if (problem) {
      drop(image);
      URL.revokeObjectURL(image.url);
      toast(problem);
      return;
    }
    image.el.classList.remove("is-uploading");
    changed();
  }

  attachButton.addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    addFiles(fileInput.files);
    fileInput.value = "";
    textarea.focus();
  });
  textarea.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData?.files || []).filter((file) =>
      file.type.startsWith("image/"),
    );
    if (!files.length) return;
    event.preventDefault();
    addFiles(files);
  });

  let dragDepth = 0;
  const carriesFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  main.addEventListener("dragenter", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    dropZone.hidden = false;
  });
  main.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  main.addEventListener("dragleave", (event) => {
    if (!carriesFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) dropZone.hidden = true;
  });
  main.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    dropZone.hidden = true;
    addFiles(event.dataTransfer.files);
    textarea.focus();
  });

  return {
    get count() {
      return attached.length;
    },
    get uploading() {
      return attached.some((image) => image.uploading);
    },
    // The images to send with a message; the composer is empty again.
    take() {
      const images = attached;
      attached = [];
      tray.replaceChildren();
      return images;
    },
    restore,
  };
}
