// A plain SVG line chart for the dashboard (no chart library: nothing to vendor).
// draw(svg, points, {from, to, threshold}) redraws `svg` with `points` = [[t, value|null]]
// over the time span [from, to]; null values break the line; an optional threshold is a
// dashed horizontal line. Presentation attributes only (no style attributes: the page's
// Content-Security-Policy forbids inline styles).
const NS = "http://www.w3.org/2000/svg";
const W = 300;
const H = 80;
const PAD = 4;

export function draw(svg, points, { from, to, threshold = null }) {
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const values = points.map((p) => p[1]).filter((v) => v != null && Number.isFinite(v));
  let max = Math.max(1e-9, ...values, threshold != null && Number.isFinite(threshold) ? threshold : 0);
  max *= 1.1;
  const x = (t) => PAD + ((t - from) / Math.max(1e-9, to - from)) * (W - 2 * PAD);
  const y = (v) => H - PAD - (v / max) * (H - 2 * PAD);
  const shapes = [];
  let run = [];
  const flush = () => {
    if (run.length === 1) run.push([run[0][0] + 0.5, run[0][1]]);
    if (run.length) shapes.push(node("polyline", { points: run.map((p) => p.join(",")).join(" "), class: "line" }));
    run = [];
  };
  for (const [t, v] of points) {
    if (t < from) continue;
    if (v == null || !Number.isFinite(v)) flush();
    else run.push([x(t).toFixed(1), y(v).toFixed(1)]);
  }
  flush();
  if (threshold != null && Number.isFinite(threshold) && threshold <= max) {
    const ty = y(threshold).toFixed(1);
    shapes.unshift(node("line", { x1: PAD, x2: W - PAD, y1: ty, y2: ty, class: "threshold" }));
  }
  svg.replaceChildren(...shapes);
}

function node(tag, attrs) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}
