// A small SVG line chart: a few series over training steps, with nice axis ticks and a hover readout.

import { s } from "./dom.js";
import { number } from "./format.js";

const WIDTH = 520;
const HEIGHT = 220;
const PAD = { left: 58, right: 14, top: 10, bottom: 26 };
export const COLOURS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea"];

const MAX_POINTS = 1500; // per line: a long run is drawn from every k-th point (and its last)

function thin(points, max) {
  if (points.length <= max) return points;
  const every = Math.ceil(points.length / max);
  return points.filter((_, i) => i % every === 0 || i === points.length - 1);
}

/** [min, max] of a long array (Math.min(...values) overflows the call stack past ~100k values). */
function extent(values) {
  let low = Infinity;
  let high = -Infinity;
  for (const value of values) {
    if (value < low) low = value;
    if (value > high) high = value;
  }
  return [low, high];
}

/** About `count` round tick values covering [low, high]. */
function ticks(low, high, count) {
  if (low === high) {
    const pad = Math.abs(low) * 0.1 || 1;
    low -= pad;
    high += pad;
  }
  const raw = (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((candidate) => candidate >= raw);
  const first = Math.floor(low / step) * step;
  const values = [];
  for (let value = first; value < high + step * 0.999; value += step) values.push(Number(value.toPrecision(12)));
  return values;
}

/**
 * The chart of `series` ([{name, points: [[step, value], ...]}]) as an <svg>. Each line carries
 * data-series and data-count (its number of points). `onHover(step, values)` gets the values nearest
 * the pointer (null when it leaves). `marker` ({step, label}) draws a labelled line at that step (the best
 * checkpoint).
 */
export function lineChart(series, onHover, marker = null) {
  series = series.map((line) => ({ ...line, points: thin(line.points, MAX_POINTS) }));
  const all = series.flatMap((line) => line.points);
  const xs = all.map(([x]) => x);
  const ys = all.map(([, y]) => y);
  const [xLow, xHigh] = extent(xs);
  const [yLow, yHigh] = extent(ys);
  const xTicks = ticks(Math.min(xLow, 0), Math.max(xHigh, 1), 5).filter((x) => x >= 0);
  const yTicks = ticks(yLow, yHigh, 4);
  const [x0, x1] = [xTicks[0], xTicks.at(-1)];
  const [y0, y1] = [yTicks[0], yTicks.at(-1)];
  const px = (x) => PAD.left + ((x - x0) / (x1 - x0 || 1)) * (WIDTH - PAD.left - PAD.right);
  const py = (y) => HEIGHT - PAD.bottom - ((y - y0) / (y1 - y0 || 1)) * (HEIGHT - PAD.top - PAD.bottom);

  const grid = [
    ...yTicks.map((y) => [
      s("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: py(y), y2: py(y) }),
      s("text", { class: "tick", x: PAD.left - 6, y: py(y) + 4, "text-anchor": "end" }, number(y)),
    ]),
    ...xTicks.map((x) => s("text", { class: "tick", x: px(x), y: HEIGHT - 8, "text-anchor": "middle" }, number(x))),
  ];
  const lines = series.map((line, index) => {
    const colour = COLOURS[index % COLOURS.length];
    const path = line.points.map(([x, y], i) => `${i ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join("");
    const dots = line.points.length <= 40
      ? line.points.map(([x, y]) => s("circle", { cx: px(x), cy: py(y), r: 2.2, fill: colour }))
      : [];
    return s("g", {},
      s("path", { class: "line", d: path, stroke: colour, "data-series": line.name, "data-count": line.points.length }),
      dots);
  });
  const cursor = s("line", { class: "cursor", y1: PAD.top, y2: HEIGHT - PAD.bottom, visibility: "hidden" });
  const marked = marker && marker.step >= x0 && marker.step <= x1
    ? s("g", { class: "marker", "data-step": marker.step },
      s("line", { x1: px(marker.step), x2: px(marker.step), y1: PAD.top, y2: HEIGHT - PAD.bottom }),
      s("text", { x: px(marker.step) + 4, y: PAD.top + 10 }, marker.label))
    : null;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img" }, grid, lines, marked, cursor);

  svg.addEventListener("pointermove", (event) => {
    const box = svg.getBoundingClientRect();
    const step = x0 + ((event.clientX - box.left) * (WIDTH / box.width) - PAD.left)
      / (WIDTH - PAD.left - PAD.right) * (x1 - x0);
    const nearest = xs.reduce((best, x) => (Math.abs(x - step) < Math.abs(best - step) ? x : best), xs[0]);
    cursor.setAttribute("x1", px(nearest));
    cursor.setAttribute("x2", px(nearest));
    cursor.setAttribute("visibility", "visible");
    onHover?.(nearest, series.map((line) => line.points.find(([x]) => x === nearest)?.[1] ?? null));
  });
  svg.addEventListener("pointerleave", () => {
    cursor.setAttribute("visibility", "hidden");
    onHover?.(null, null);
  });
  return svg;
}
