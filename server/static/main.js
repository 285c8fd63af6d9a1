// The page's start: find the served model (asking for the API key when the server needs one),
// then run the chat and the live view of the engine.

import { AuthRequired, apiFetch, errorMessage, setApiKey } from "./api.js";
import { Chat } from "./chat.js";
import { EngineView } from "./engine_view.js";

const status = document.getElementById("status");
const keyForm = document.getElementById("key-form");
let chat = null;
const view = new EngineView(askForKey);

function askForKey() {
  view.stop();
  keyForm.hidden = false;
  status.textContent = "This server needs an API key.";
  document.getElementById("key-input").focus();
}

keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  setApiKey(document.getElementById("key-input").value.trim());
  start();
});

async function start() {
  let models;
  try {
    const response = await apiFetch("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    models = await response.json();
  } catch (e) {
    if (e instanceof AuthRequired) askForKey();
    else status.textContent = `cannot reach the server: ${e.message}`;
    return;
  }
  keyForm.hidden = true;
  const model = models.data[0].id;
  document.getElementById("model-name").textContent = model;
  status.textContent = "";
  if (chat === null) chat = new Chat(model, askForKey);
  view.start();
  document.body.dataset.ready = "true";
}

start();
