// The "Open a stream" form: go to /watch/{name}, with ?token= when one was given.
"use strict";

document.getElementById("open").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = document.getElementById("open-stream").value.trim();
  const token = document.getElementById("open-token").value.trim();
  if (!name) return;
  location.href = "/watch/" + encodeURIComponent(name) +
    (token ? "?token=" + encodeURIComponent(token) : "");
});
