// The service's REST API as the page calls it. Paths are relative, so the page also works behind a
// proxy that serves the service under a prefix. Every call carries the session's API key, if any.

const KEY_ITEM = "posttrain.apiKey";

/** 401 (no key) or 403 (a key the server does not accept): the page asks for a key again. */
export class AuthError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const apiKey = () => sessionStorage.getItem(KEY_ITEM);

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

const enc = encodeURIComponent;

async function call(path, options = {}) {
  const key = apiKey();
  const headers = { ...options.headers, ...(key ? { Authorization: `Bearer ${key}` } : {}) };
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try {
    message = (await response.json()).detail ?? message;
  } catch {
    // not a JSON error body (a proxy's page, say): keep the status line
  }
  throw response.status === 401 || response.status === 403
    ? new AuthError(response.status, message)
    : new ApiError(response.status, message);
}

const json = (path, options) => call(path, options).then((response) => response.json());

export const artifactUrl = (id, path) => `v1/jobs/${enc(id)}/artifacts/${path.split("/").map(enc).join("/")}`;

export const api = {
  listJobs: (limit, offset) => json(`v1/jobs?limit=${limit}&offset=${offset}`),
  job: (id) => json(`v1/jobs/${enc(id)}`),
  metrics: (id, sinceStep) => json(`v1/jobs/${enc(id)}/metrics${sinceStep === null ? "" : `?since_step=${sinceStep}`}`),
  artifacts: (id) => json(`v1/jobs/${enc(id)}/artifacts`),
  /** The latest and best evaluation, and the answers of one (default: the latest). */
  evaluation: (id, step) => json(`v1/jobs/${enc(id)}/eval${step === undefined || step === null ? "" : `?step=${step}`}`),
  cancel: (id) => json(`v1/jobs/${enc(id)}/cancel`, { method: "POST" }),
  pause: (id) => json(`v1/jobs/${enc(id)}/pause`, { method: "POST" }),
  resume: (id) => json(`v1/jobs/${enc(id)}/resume`, { method: "POST" }),
  /** The file as a Blob: a plain link cannot send the Authorization header a keyed server needs. */
  download: (id, path) => call(artifactUrl(id, path)).then((response) => response.blob()),
  /** A served model (OpenAI's model object): by a job id, that job's trained model; 404 when it has none. */
  model: (id) => json(`v1/models/${enc(id)}`),
};

/** One server-sent event block ("event: x\ndata: y\n...") as {type, data}; null for a keep-alive comment. */
function parseEvent(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { type, data: data.join("\n") } : null;
}

/**
 * The job's log as events: {type: "message", data: line} for each line (the last `tail` first, then new
 * ones as they are written), then {type: "end", data: '{"state": ...}'}. EventSource cannot send an
 * Authorization header, so the stream is read from fetch's body. Abort `signal` to stop following.
 */
export async function* followLog(id, tail, signal) {
  yield* events(await call(`v1/jobs/${enc(id)}/logs?follow=true&tail=${tail}`, { signal }));
}

/** The SSE events of a response body, as parseEvent gives them. */
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (event) yield event;
    }
  }
}

/**
 * POST /v1/chat/completions with stream: true; yields each chunk (OpenAI's chat.completion.chunk) as it
 * arrives, until [DONE]. An error the server sends mid-stream is thrown as an ApiError.
 */
export async function* chatStream(body, signal) {
  const response = await call("v1/chat/completions", {
    method: "POST", signal, headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
  });
  for await (const event of events(response)) {
    if (event.data === "[DONE]") return;
    const chunk = JSON.parse(event.data);
    if (chunk.error) throw new ApiError(500, chunk.error.message);
    yield chunk;
  }
}

/**
 * Run `tick` now and then every `seconds` until it returns false, fails with a 404, or the returned stop
 * function is called. Errors go to `page.onError` (which asks for a key again on 401/403 and stops the page); a tick that
 * works again clears the error banner.
 */
export function poll(seconds, tick, page) {
  let timer = null;
  let stopped = false;
  async function run() {
    let again = true;
    try {
      again = (await tick()) !== false;
      page.onSuccess();
    } catch (error) {
      // A job that is gone (deleted, or not the caller's) will not come back: stop asking.
      if (page.onError(error) === "stop" || error.status === 404) return;
    }
    if (again && !stopped) timer = setTimeout(run, seconds * 1000);
  }
  run();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
