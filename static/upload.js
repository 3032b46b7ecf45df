// Progressive enhancement for the upload form: drag and drop onto the page, and previews of the
// chosen images before sending. The form works the same without this script.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  const input = document.getElementById("image-input");
  const zone = document.getElementById("drop-zone");
  const preview = document.getElementById("preview");
  if (!form || !input || !zone || !preview) { return; }

  function showPreviews() {
    preview.replaceChildren();
    for (const file of input.files) {
      if (!file.type.startsWith("image/")) { continue; }
      const img = document.createElement("img");
      img.alt = file.name;
      img.title = file.name;
      img.src = URL.createObjectURL(file);
      img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
      preview.append(img);
    }
  }

  input.addEventListener("change", showPreviews);
  for (const target of [zone, document.body]) {
    target.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("dragover");
    });
    target.addEventListener("dragleave", () => zone.classList.remove("dragover"));
    target.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragover");
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        showPreviews();
      }
    });
  }
  form.addEventListener("submit", () => {
    const button = form.querySelector("button[type=submit]");
    if (button) { button.disabled = true; button.textContent = "Classifying…"; }
  });
})();
