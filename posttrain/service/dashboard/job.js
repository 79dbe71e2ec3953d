// One job (#/jobs/<id>): its state and progress, live training and evaluation curves (the best checkpoint
// marked), the log as it is written, its files, pause/resume and cancel; once it has succeeded, a playground for
// its model (playground.js).

import { AuthError, api, apiKey, artifactUrl, followLog, poll } from "./api.js";
import { h } from "./dom.js";
import { ago, bytes, dateTime, duration, isFinished, number, runTime, stateClass } from "./format.js";
import { progress } from "./list.js";
import { playground } from "./playground.js";
import { COLOURS, lineChart } from "./plot.js";

// Metric keys drawn, one panel per group (a panel appears once one of its keys has a value). Evaluation
// records (eval_*) join the training records of their step; the eval metrics no panel names (graders, the
// regression set) get the "Evaluation" panel.
const PANELS = [
  { title: "Loss", keys: ["loss", "eval_loss"] },
  { title: "Reward", keys: ["reward", "reward_mean", "rewards/margins", "eval_rewards/margins"] },
  { title: "Learning rate", keys: ["learning_rate"] },
  { title: "Accuracy", keys: ["rewards/accuracies", "accuracy", "eval_accuracy", "eval_rewards/accuracies",
    "mean_token_accuracy", "eval_mean_token_accuracy"] },
];
const NOT_DRAWN = new Set(["eval_regression_forgotten", "eval_pairwise_accuracy"]); // counts, or drawn as another key
const LOG_TAIL = 500; // lines fetched when the page opens
const LOG_KEEP = 3000; // lines kept on the page
const FILES_EVERY = 3; // refresh the file list every this many polls
const JOB_FILES = ["spec.json", "status.json", "metrics.jsonl", "worker.log"]; // every job directory has these

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

function legend(name, value, index) {
  const swatch = h("span", { class: "swatch" });
  swatch.style.background = COLOURS[index % COLOURS.length];
  return h("span", { class: "legend" }, swatch, `${name} `, h("strong", {}, number(value)));
}

/** The eval_* keys of `records` that no panel draws: one line each on the Evaluation panel. */
export function evaluationKeys(records) {
  const named = new Set(PANELS.flatMap((panel) => panel.keys));
  const keys = new Set();
  for (const record of records) {
    for (const [key, value] of Object.entries(record)) {
      if (key.startsWith("eval_") && Number.isFinite(value) && !named.has(key) && !NOT_DRAWN.has(key)) keys.add(key);
    }
  }
  return [...keys].sort();
}

function chartPanel(title, series, marker) {
  const readout = h("span", { class: "readout" });
  const latest = () => readout.replaceChildren(...series.map((line, i) => legend(line.name, line.points.at(-1)[1], i)));
  const hover = (step, values) => {
    if (step === null) return latest();
    readout.replaceChildren(h("span", { class: "muted" }, `step ${number(step)}`),
      ...series.map((line, i) => (values[i] === null ? null : legend(line.name, values[i], i))));
  };
  latest();
  return h("figure", { class: "panel", "data-panel": title },
    h("figcaption", {}, h("strong", {}, title), readout), lineChart(series, hover, marker));
}

/** Files grouped by checkpoint (and other folders) so a job with many checkpoints stays readable. */
function fileGroups(listing) {
  const groups = new Map([["", []]]);
  for (const file of listing.artifacts) {
    const parts = file.path.split("/");
    const group = parts[0] === "checkpoints" && parts.length > 2 ? parts.slice(0, 2).join("/")
      : parts.length > 1 ? parts[0] : "";
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push(file);
  }
  return groups;
}

export function jobView(page, id) {
  const streams = new AbortController();
  const title = h("h1", {});
  const badge = h("span", {});
  const cancelButton = h("button", { type: "button", class: "danger", id: "cancel-job", hidden: true, onclick: cancel },
    "Cancel job");
  const pauseButton = h("button", { type: "button", id: "pause-job", hidden: true, onclick: pauseOrResume }, "Pause");
  const facts = h("dl", { class: "facts" });
  const errorBox = h("pre", { class: "error-box", hidden: true });
  const charts = h("div", { class: "charts" }, h("p", { class: "muted" }, "No metrics yet."));
  const logBox = h("pre", { class: "log", id: "log" });
  const logState = h("span", { class: "muted small", id: "log-state" }, "connecting…");
  const files = h("div", { class: "files" });
  const playgroundSlot = h("div", {});
  page.main.append(
    h("a", { href: "#/", class: "back" }, "← All jobs"),
    h("section", { class: "card" },
      h("div", { class: "card-head" }, h("div", { class: "title" }, title, badge),
        h("div", { class: "actions" }, pauseButton, cancelButton)), facts, errorBox),
    playgroundSlot,
    h("section", { class: "card" }, h("h2", {}, "Curves"), charts),
    h("section", { class: "card" }, h("div", { class: "card-head" }, h("h2", {}, "Log"), logState), logBox),
    h("section", { class: "card" }, h("h2", {}, "Checkpoints and files"), files));

  const byStep = new Map(); // step -> that step's metrics (train and eval records merged)
  let lastStep = null;
  let job = null;
  let polls = 0;
  let shownFiles = "";
  let playgroundAsked = false;
  let stopPlayground = null;
  let chartedBest = "null"; // the best checkpoint the charts mark
  const openGroups = new Set();

  function latest(key) {
    let found = null;
    for (const record of byStep.values()) {
      if (Number.isFinite(record[key]) && (found === null || record.step >= found.step)) found = record;
    }
    return found?.[key] ?? null;
  }

  function render() {
    title.textContent = job.name ?? job.id;
    document.title = `${job.name ?? job.id} · posttrain`;
    badge.className = stateClass(job.state);
    badge.textContent = job.state;
    cancelButton.hidden = isFinished(job.state);
    cancelButton.disabled = job.cancel_requested;
    cancelButton.textContent = job.cancel_requested ? "Cancelling…" : "Cancel job";
    // Pause keeps the work done (a checkpoint at the next step); resume continues from it.
    const paused = job.state === "paused";
    pauseButton.hidden = isFinished(job.state) || job.cancel_requested;
    pauseButton.disabled = Boolean(job.pause_requested);
    pauseButton.textContent = paused ? "Resume" : job.pause_requested ? "Pausing…" : "Pause";
    // The last training record (an eval record, logged at the same step, has no speed of its own).
    const rate = latest("steps_per_s");
    const tokens = latest("tokens_per_s");
    const fact = (name, ...value) => [h("div", {}, h("dt", {}, name), h("dd", {}, ...value))];
    const when = (timestamp) => (timestamp ? h("span", { title: dateTime(timestamp) }, ago(timestamp)) : "–");
    facts.replaceChildren(
      ...fact("Id", h("span", { class: "mono" }, job.id)),
      ...fact("Method", job.method),
      ...fact("Model", h("span", { class: "mono" }, job.model ?? "–")),
      ...fact("Progress", progress(job, rate)),
      // A pipeline job: each stage with its state and steps, in order.
      ...(job.stages ? fact("Stages", job.stages.map((stage) => `${stage.name} ${stage.state}`
        + (stage.total_steps ? ` ${stage.step}/${stage.total_steps}` : "")).join(" → ")) : []),
      ...fact("Created", when(job.created_at)),
      ...fact("Started", when(job.started_at ?? job.launched_at)),
      ...fact(isFinished(job.state) ? "Ran for" : "Running for", duration(runTime(job))),
      ...fact("Attempt", `${job.attempt}`, job.retries ? ` (${job.retries} retries)` : ""),
      ...(rate ? fact("Speed", `${number(rate)} steps/s`) : []),
      ...(tokens ? fact("Tokens/s", number(tokens)) : []),
      ...(job.best ? fact("Best checkpoint", h("span", { id: "best-checkpoint" },
        `${job.best.checkpoint.split("/").at(-1)} · ${job.best.metric} ${number(job.best.value)}`)) : []),
      ...(job.warnings?.length ? fact("Warnings", h("span", { class: "warning" }, job.warnings.at(-1))) : []));
    errorBox.hidden = !job.error;
    errorBox.textContent = job.error ?? "";
  }

  async function loadMetrics() {
    let changed = false;
    for (;;) {
      // From the last step seen, inclusive: an eval record may join a step already shown.
      const before = lastStep;
      const pageOf = await api.metrics(id, lastStep === null ? null : Math.max(-1, lastStep - 1));
      for (const record of pageOf.metrics) {
        if (typeof record.step !== "number") continue;
        const known = byStep.get(record.step);
        const merged = { ...known, ...record };
        // The last step comes back on every poll: redraw (and lose a hover readout) only for news.
        if (!known || JSON.stringify(known) !== JSON.stringify(merged)) changed = true;
        byStep.set(record.step, merged);
        lastStep = Math.max(lastStep ?? record.step, record.step);
      }
      if (!pageOf.more || lastStep === before) return changed;
    }
  }

  function renderCharts() {
    const records = [...byStep.values()].sort((a, b) => a.step - b.step);
    const panels = [];
    const marker = job?.best ? { step: job.best.step, label: "best" } : null;
    chartedBest = JSON.stringify(job?.best ?? null);
    for (const panel of [...PANELS, { title: "Evaluation", keys: evaluationKeys(records) }]) {
      const series = panel.keys
        .map((key) => ({ name: key, points: records.filter((r) => Number.isFinite(r[key])).map((r) => [r.step, r[key]]) }))
        .filter((line) => line.points.length);
      const evaluated = series.some((line) => line.name.startsWith("eval_"));
      if (series.length) panels.push(chartPanel(panel.title, series, evaluated ? marker : null));
    }
    if (panels.length) charts.replaceChildren(...panels);
  }

  function fileLink(path) {
    return h("a", {
      href: artifactUrl(id, path), download: path.split("/").at(-1), class: "file-link",
      onclick: (event) => {
        // With a key, a plain link would be refused (it cannot carry the header): fetch, then save.
        if (!apiKey()) return;
        event.preventDefault();
        api.download(id, path).then((blob) => {
          const url = URL.createObjectURL(blob);
          h("a", { href: url, download: path.split("/").at(-1) }).click();
          setTimeout(() => URL.revokeObjectURL(url), 60_000);
        }).catch(page.onError);
      },
    }, path);
  }

  function renderFiles(listing) {
    const shown = JSON.stringify([listing, job?.best ?? null]);
    if (shown === shownFiles) return;
    shownFiles = shown;
    const table = (entries) => h("table", { class: "file-table" }, entries.map((file) =>
      h("tr", {}, h("td", {}, fileLink(file.path)), h("td", { class: "size" }, bytes(file.size)))));
    const sections = [];
    const best = job?.best?.checkpoint;
    for (const [group, entries] of fileGroups(listing)) {
      if (!entries.length) continue;
      if (!group) {
        sections.push(table(entries));
        continue;
      }
      const size = entries.reduce((sum, file) => sum + file.size, 0);
      const details = h("details", { "data-group": group, open: openGroups.has(group) },
        h("summary", {}, h("strong", {}, group), group === best ? h("span", { class: "badge best" }, "best") : null,
          h("span", { class: "muted" }, ` · ${entries.length} files · ${bytes(size)}`)),
        table(entries));
      details.addEventListener("toggle", () => (details.open ? openGroups.add(group) : openGroups.delete(group)));
      sections.push(details);
    }
    const summary = listing.artifacts.length
      ? `${listing.checkpoints.length} complete checkpoints${listing.final ? " and the final model (final/)" : ""}: `
        + `${listing.artifacts.length} files, ${bytes(listing.total_size)}`
      : "No checkpoints yet.";
    files.replaceChildren(
      h("p", { class: "job-files" }, "Job directory: ", JOB_FILES.map((path, i) => [i ? " · " : "", fileLink(path)])),
      h("p", { class: "muted small" }, summary), ...sections);
  }

  function gone(error) {
    streams.abort();
    page.main.replaceChildren(h("a", { href: "#/", class: "back" }, "← All jobs"),
      h("section", { class: "card", id: "no-job" }, h("h1", {}, "No such job"),
        h("p", { class: "muted" }, `The server says: ${error.message}. It was deleted, or your key does not reach it.`)));
  }

  async function refresh() {
    try {
      job = await api.job(id);
    } catch (error) {
      if (error.status !== 404) throw error;
      gone(error);
      return false;
    }
    const grew = await loadMetrics();
    render();
    if (grew || JSON.stringify(job.best ?? null) !== chartedBest) renderCharts();
    const finished = isFinished(job.state);
    if (polls++ % FILES_EVERY === 0 || finished) renderFiles(await api.artifacts(id));
    if (job.state === "succeeded" && !playgroundAsked) {
      playgroundAsked = true;
      playground(page, id).then((shown) => {
        if (!shown || streams.signal.aborted) return;
        playgroundSlot.replaceChildren(shown.element);
        stopPlayground = shown.stop;
      }).catch(page.onError);
    }
    return !finished; // a finished job changes no more: stop polling
  }

  async function cancel() {
    if (!window.confirm(`Cancel job ${id}? A running job stops after its current step; this cannot be undone.`)) return;
    cancelButton.disabled = true;
    try {
      job = await api.cancel(id);
      render();
    } catch (error) {
      page.onError(error);
      cancelButton.disabled = false;
    }
  }

  async function pauseOrResume() {
    pauseButton.disabled = true;
    try {
      job = await (job.state === "paused" ? api.resume(id) : api.pause(id));
      render();
    } catch (error) {
      page.onError(error);
      pauseButton.disabled = false;
    }
  }

  function appendLines(lines) {
    const atEnd = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 8;
    logBox.append(...lines.map((line) => h("div", { class: "line" }, line || "\u00a0")));
    while (logBox.childElementCount > LOG_KEEP) logBox.firstElementChild.remove();
    if (atEnd) logBox.scrollTop = logBox.scrollHeight;
  }

  async function followLogs() {
    while (!streams.signal.aborted) {
      try {
        logBox.replaceChildren(); // each (re)connection starts with the tail again
        logState.textContent = "following";
        let batch = [];
        const flush = () => { appendLines(batch); batch = []; };
        let timer = null;
        for await (const event of followLog(id, LOG_TAIL, streams.signal)) {
          if (event.type === "end") {
            flush();
            const state = JSON.parse(event.data).state;
            logState.textContent = `ended: job ${state ?? "deleted"}`;
            if (state !== "paused") return;
            break; // a paused job has no worker until it is resumed; follow again then
          }
          batch.push(event.data);
          // Lines arrive in bursts (the tail, then a log call's lines): draw them once per frame.
          timer ??= requestAnimationFrame(() => { timer = null; flush(); });
        }
      } catch (error) {
        if (streams.signal.aborted) return;
        if (error instanceof AuthError || error.status === 404) {
          logState.textContent = "";
          page.onError(error);
          return;
        }
        logState.textContent = `reconnecting: ${error.message}`;
      }
      await sleep(3000, streams.signal);
      while (job?.state === "paused" && !streams.signal.aborted) await sleep(1000, streams.signal);
    }
  }

  followLogs();
  const stopPolling = poll(2, refresh, page);
  return () => {
    stopPolling();
    streams.abort();
    stopPlayground?.();
  };
}
