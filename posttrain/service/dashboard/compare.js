// Several jobs side by side (#/compare/<id>,<id>,...): each one's latest evaluation scores and best
// checkpoint, then their answers to the same held-out prompts.

import { api, poll } from "./api.js";
import { h } from "./dom.js";
import { isFinished, number, stateClass } from "./format.js";
import { jobLink } from "./list.js";

const ANSWERS_SHOWN = 50; // prompts shown (every answer: GET /v1/jobs/<id>/eval, or eval/ in the job directory)
const LOWER_IS_BETTER = /loss|forgotten|perplexity/;

const promptText = (prompt) => (Array.isArray(prompt) ? prompt.at(-1)?.content ?? "" : String(prompt ?? ""));

function scoresTable(jobs) {
  const names = [];
  for (const job of jobs) {
    for (const name of Object.keys(job.eval?.metrics ?? {})) if (!names.includes(name)) names.push(name);
  }
  const head = h("tr", {}, h("th", {}, "metric"), jobs.map((job) => h("th", { "data-job-id": job.id },
    h("a", { href: jobLink(job.id) }, job.name ?? job.id), " ", h("span", { class: stateClass(job.state) }, job.state),
    h("div", { class: "small muted" }, job.eval ? `${job.method} · eval at step ${job.eval.step}` : job.method))));
  const rows = names.map((name) => {
    const values = jobs.map((job) => job.eval?.metrics?.[name]);
    const finite = values.filter(Number.isFinite);
    const top = finite.length > 1 ? (LOWER_IS_BETTER.test(name) ? Math.min(...finite) : Math.max(...finite)) : null;
    return h("tr", { "data-metric": `eval_${name}` }, h("td", {}, `eval_${name}`),
      values.map((value) => h("td", { class: `value${value === top ? " top" : ""}` }, number(value))));
  });
  const best = h("tr", { "data-metric": "best" }, h("td", {}, "best checkpoint"), jobs.map((job) => h("td", { class: "value" },
    job.best ? `${job.best.checkpoint.split("/").at(-1)} (${job.best.metric} ${number(job.best.value)})` : "–")));
  return h("table", { class: "compare", id: "compare-scores" }, h("thead", {}, head), h("tbody", {}, rows, best));
}

function answersTable(jobs, reports) {
  // The same prompt in every job's answers (same eval data and sample) makes one row.
  const byJob = reports.map((report) => new Map(report.answers.map((a) => [`${a.set} ${JSON.stringify(a.prompt)}`, a])));
  const keys = [];
  for (const report of reports) {
    for (const answer of report.answers) {
      const key = `${answer.set} ${JSON.stringify(answer.prompt)}`;
      if (!keys.includes(key)) keys.push(key);
    }
  }
  if (!keys.length) return h("p", { class: "muted" }, "No answers yet: a job keeps them when its evaluation has graders "
    + "or a regression set.");
  const head = h("tr", {}, h("th", {}, "prompt"), h("th", {}, "reference"),
    jobs.map((job, i) => h("th", {}, job.name ?? job.id, h("div", { class: "small muted" },
      reports[i].step === null ? "" : `step ${reports[i].step}`))));
  const rows = keys.slice(0, ANSWERS_SHOWN).map((key) => {
    const first = byJob.find((answers) => answers.has(key)).get(key);
    return h("tr", { class: "answer-row" },
      h("td", { class: "answer" }, first.set === "regression" ? h("span", { class: "badge" }, "regression") : null,
        promptText(first.prompt)),
      h("td", { class: "answer" }, first.reference),
      byJob.map((answers) => {
        const answer = answers.get(key);
        const scores = Object.entries(answer?.scores ?? {}).map(([name, value]) => `${name} ${number(value)}`).join(" · ");
        return h("td", { class: "answer" }, answer ? answer.answer : "–",
          scores ? h("div", { class: "small muted" }, scores) : null);
      }));
  });
  return h("table", { class: "compare", id: "compare-answers" }, h("thead", {}, head), h("tbody", {}, rows));
}

export function compareView(page, ids) {
  const scores = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const answers = h("div");
  page.main.append(
    h("a", { href: "#/", class: "back" }, "← All jobs"),
    h("section", { class: "card" },
      h("div", { class: "card-head" }, h("h1", {}, "Compare"),
        h("span", { class: "muted" }, `${ids.length} jobs, each at its latest evaluation`)), scores),
    h("section", { class: "card" }, h("h2", {}, "Answers to the same held-out prompts"), answers));
  document.title = "compare · posttrain";
  let shown = "";

  async function refresh() {
    const jobs = await Promise.all(ids.map((id) => api.job(id)));
    const reports = await Promise.all(ids.map((id) => api.evaluation(id)));
    const key = JSON.stringify([jobs.map((job) => [job.state, job.eval, job.best]), reports.map((r) => r.step)]);
    if (key !== shown) {
      shown = key;
      scores.replaceChildren(scoresTable(jobs));
      answers.replaceChildren(answersTable(jobs, reports));
    }
    return !jobs.every((job) => isFinished(job.state)); // finished jobs change no more
  }

  return poll(5, refresh, page);
}
