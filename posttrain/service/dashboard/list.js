// The job list (#/): newest first, refreshed every few seconds.

import { api, poll } from "./api.js";
import { h } from "./dom.js";
import { ago, dateTime, duration, eta, number, runTime, stateClass } from "./format.js";

const PAGE_SIZE = 50;
const COLUMNS = ["Job", "State", "Method", "Model", "Progress", "Created", "Duration"];

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

function row(job) {
  return h("tr", { class: "job-row", "data-job-id": job.id, onclick: () => { location.hash = jobLink(job.id); } },
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
  page.main.append(h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h1", {}, "Jobs"), summary),
    h("table", { class: "jobs" }, h("thead", {}, h("tr", {}, COLUMNS.map((name) => h("th", {}, name)))), body),
    h("div", { class: "pager" }, newer, older)));

  async function refresh() {
    const listing = await api.listJobs(PAGE_SIZE, offset);
    body.replaceChildren(...listing.jobs.map(row));
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
