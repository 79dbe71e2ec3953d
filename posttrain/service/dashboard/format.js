// How numbers, times and states read on the page. Times from the API are Unix seconds (the server's clock).

const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
// States with a colour of their own; any other state the server reports is shown as plain text.
const COLOURED = new Set(["queued", "running", "paused", "succeeded", "failed", "cancelled"]);

export const isFinished = (state) => FINISHED.has(state);

export function stateClass(state) {
  return COLOURED.has(state) ? `state state-${state}` : "state state-other";
}

export function number(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return value === null || value === undefined ? "–" : String(value);
  if (Number.isInteger(value) && Math.abs(value) < 1e6) return value.toLocaleString("en-US");
  const size = Math.abs(value);
  if (size !== 0 && (size < 1e-3 || size >= 1e6)) return value.toExponential(2);
  return String(Number(value.toPrecision(4)));
}

export function bytes(size) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${unit ? size.toFixed(1) : size} ${units[unit]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m ${String(seconds % 60).padStart(2, "0")}s`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours}h ${String(minutes % 60).padStart(2, "0")}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

export const now = () => Date.now() / 1000;

export function ago(timestamp) {
  if (!timestamp) return "–";
  const seconds = now() - timestamp;
  if (seconds < 5) return "just now";
  return `${duration(seconds).split(" ")[0]} ago`;
}

export function dateTime(timestamp) {
  return timestamp ? new Date(timestamp * 1000).toLocaleString() : "";
}

/** How long a job ran (or has been running). */
export function runTime(job) {
  const start = job.started_at ?? job.launched_at;
  if (!start) return null;
  return (job.finished_at ?? (isFinished(job.state) ? job.updated_at : now())) - start;
}

/** Seconds left, from a steps-per-second rate (the worker's own, else the average since launch). */
export function eta(job, stepsPerSecond) {
  if (job.state !== "running" || !job.total_steps || !job.step) return null;
  let rate = stepsPerSecond;
  if (!(rate > 0)) {
    const start = job.started_at ?? job.launched_at;
    rate = start ? job.step / Math.max(1, now() - start) : 0;
  }
  return rate > 0 ? Math.max(0, job.total_steps - job.step) / rate : null;
}
