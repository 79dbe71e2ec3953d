// The job list (#/): newest first, refreshed every few seconds; jobs ticked here open side by side in
// the compare page.

import { api, poll } from "./api.js";
import { h } from "./dom.js";
import { ago, dateTime, duration, eta, number, runTime, stateClass } from "./format.js";

const PAGE_SIZE = 50;
const COLUMNS = ["", "Job", "State", "Method", "Model", "Progress", "Created", "Duration"];

/** A progress bar with "step / total" and the time left; `stepsPerSecond` is the worker's rate if known. */
export function progress(job, stepsPerSecond) {
  const total = job.total_steps;
  const done = job.state === "succeeded" ? 1 : total ? Math.min(1, job.step / total) : 0;
  const fill = h("div", { class: "fill" });
  fill.style.width = `${(done * 100).toFixed(1)}%`;
  const left = eta(job, stepsPerSecond);
  const steps = total ? `${number(job.step)} / ${number(total)}` : job.step ? `step ${number(job.step)}` : "–";
  return h("div", { class: `progress progress-${job.state}` },
    h("div", { class: "bar" }, fill),
    h("div", { class: "small muted" }, steps, left === null ? "" : ` · ${duration(left)} left`));
}

export const jobLink = (id) => `#/jobs/${encodeURIComponent(id)}`;

export const compareLink = (ids) => `#/compare/${ids.map(encodeURIComponent).join(",")}`;

function row(job, picked, onPick) {
  const pick = h("input", { type: "checkbox", class: "compare-pick", title: "Compare", checked: picked.has(job.id),
    onclick: (event) => event.stopPropagation(), onchange: (event) => onPick(job.id, event.target.checked) });
  return h("tr", { class: "job-row", "data-job-id": job.id, onclick: () => { location.hash = jobLink(job.id); } },
    h("td", {}, pick),
    h("td", {},
      h("a", { class: "job-link", href: jobLink(job.id) }, job.name ?? job.id),
      job.name ? h("div", { class: "mono small muted" }, job.id) : null),
    h("td", {}, h("span", { class: stateClass(job.state) }, job.state)),
    h("td", {}, job.method),
    h("td", { class: "mono small" }, job.model ?? "–"),
    h("td", {}, progress(job)),
    h("td", { title: dateTime(job.created_at) }, ago(job.created_at)),
    h("td", {}, duration(runTime(job))));
}

export function jobListView(page) {
  let offset = 0;
  const body = h("tbody");
  const summary = h("span", { class: "muted" });
  const newer = h("button", { type: "button", class: "quiet", onclick: () => turn(-PAGE_SIZE) }, "← Newer");
  const older = h("button", { type: "button", class: "quiet", onclick: () => turn(PAGE_SIZE) }, "Older →");
  const picked = new Set(); // jobs ticked for the compare page, kept across refreshes
  const compare = h("button", { type: "button", id: "compare-jobs", disabled: true,
    onclick: () => { location.hash = compareLink([...picked]); } }, "Compare");
  const onPick = (id, on) => {
    if (on) picked.add(id);
    else picked.delete(id);
    compare.disabled = picked.size < 2;
    compare.textContent = picked.size ? `Compare ${picked.size}` : "Compare";
  };
  page.main.append(h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h1", {}, "Jobs"), h("div", { class: "actions" }, summary, compare)),
    h("table", { class: "jobs" }, h("thead", {}, h("tr", {}, COLUMNS.map((name) => h("th", {}, name)))), body),
    h("div", { class: "pager" }, newer, older)));

  async function refresh() {
    const listing = await api.listJobs(PAGE_SIZE, offset);
    body.replaceChildren(...listing.jobs.map((job) => row(job, picked, onPick)));
    if (!listing.jobs.length) {
      body.append(h("tr", {}, h("td", { colspan: COLUMNS.length, class: "empty" },
        offset ? "No jobs on this page." : "No jobs yet. Submit one with ",
        offset ? null : h("code", {}, "posttrain jobs submit job.yaml"))));
    }
    const last = offset + listing.jobs.length;
    summary.textContent = listing.total ? `${offset + 1}–${last} of ${number(listing.total)}` : "";
    newer.hidden = offset === 0;
    older.hidden = last >= listing.total;
  }

  function turn(by) {
    offset = Math.max(0, offset + by);
    refresh().catch(page.onError);
  }

  return poll(3, refresh, page);
}
