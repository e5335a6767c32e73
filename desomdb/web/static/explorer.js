// desomdb explorer: the only script. Submits the colour chooser when it changes and
// runs the SQL box on Ctrl/Cmd+Enter. Pages work without it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.submit());
  }
  const box = document.querySelector("textarea[name=q]");
  if (box) {
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        box.form.submit();
      }
    });
  }
});
