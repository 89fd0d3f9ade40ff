// fhir-plugin review pages. Kept in a static file: the CSP allows no inline script.
// A form marked data-once is sent once: its button is disabled after the first submit,
// so a double click cannot send the same write twice (the server is idempotent anyway).
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("form[data-once]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (form.dataset.sent === "1") {
        event.preventDefault();
        return;
      }
      form.dataset.sent = "1";
      form.querySelectorAll("button[type=submit]").forEach(function (b) {
        b.setAttribute("aria-busy", "true");
        b.textContent = "Working…";
      });
    });
  });
});
