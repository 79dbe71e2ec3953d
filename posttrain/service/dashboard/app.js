// The dashboard's shell: hash routes (#/ lists jobs, #/jobs/<id> shows one, #/compare/<id>,<id> compares
// jobs' evaluations), the API-key form, the error banner.

import { AuthError, apiKey, setApiKey } from "./api.js";
import { compareView } from "./compare.js";
import { h } from "./dom.js";
import { jobView } from "./job.js";
import { jobListView } from "./list.js";

const main = document.getElementById("main");
const banner = document.getElementById("banner");
const forgetKey = document.getElementById("forget-key");
let stopView = null; // what the current page calls to stop its timers and streams

function leaveView() {
  stopView?.();
  stopView = null;
}

const page = {
  main,
  onSuccess() {
    banner.hidden = true;
  },
  /** A failed call: on 401/403 the key form replaces the page ("stop"); anything else shows in the banner. */
  onError(error) {
    if (error instanceof AuthError) {
      askForKey(error);
      return "stop";
    }
    banner.textContent = `Could not load from the server: ${error.message}`;
    banner.hidden = false;
    return "retry";
  },
};

function route() {
  leaveView();
  banner.hidden = true;
  forgetKey.hidden = !apiKey();
  main.replaceChildren();
  const match = location.hash.match(/^#\/jobs\/([^/?]+)$/);
  const compared = location.hash.match(/^#\/compare\/([^/?]+)$/);
  if (compared) stopView = compareView(page, compared[1].split(",").map(decodeURIComponent).filter(Boolean));
  else stopView = match ? jobView(page, decodeURIComponent(match[1])) : jobListView(page);
}

function askForKey(error) {
  leaveView();
  // Only a key the server refused is worth a message; the first visit to a keyed server just asks.
  const refused = apiKey() ? error.message : null;
  setApiKey(null);
  forgetKey.hidden = true;
  const input = h("input", {
    type: "password", name: "api-key", id: "api-key", autocomplete: "off", required: true, placeholder: "API key",
  });
  const form = h("form", {
    class: "card key-form",
    onsubmit: (event) => {
      event.preventDefault();
      setApiKey(input.value.trim());
      route();
    },
  },
  h("h1", {}, "API key needed"),
  h("p", {}, "This server needs an API key. The page keeps it in this tab's session storage and sends it "
    + "with every request; closing the tab forgets it."),
  refused ? h("p", { class: "error", role: "alert" }, refused) : null,
  h("div", { class: "inline" }, input, h("button", { type: "submit" }, "Open")));
  main.replaceChildren(form);
  input.focus();
}

forgetKey.addEventListener("click", () => {
  setApiKey(null);
  route();
});
window.addEventListener("hashchange", route);
route();
