// Shared by both pages: the API key (kept in this browser's localStorage) and fetch with it.
"use strict";

const KEY_STORAGE = "doratweet-api-key";

function apiHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { "Authorization": "Bearer " + key } : {};
}

// Show the key field only when the server asks for a key; remember what is typed.
async function setUpKeyField() {
  const config = await (await fetch("/ui/config")).json();
  const field = document.getElementById("key-field");
  const input = document.getElementById("api-key");
  field.hidden = !config.api_key_required;
  input.value = localStorage.getItem(KEY_STORAGE) || "";
  input.addEventListener("input", () => localStorage.setItem(KEY_STORAGE, input.value.trim()));
  return config;
}

// The server's error message (FastAPI puts it in "detail"), as one readable line.
async function errorMessage(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (ignored) { /* not JSON: keep the status text */ }
  return `HTTP ${response.status}: ${detail}`;
}
