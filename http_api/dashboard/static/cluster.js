// The cluster's side of the page: the ring, one card per rank, the live figures and the
// tokens/s chart, all drawn from one /v1/cluster record. Text goes in with textContent.

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function div(className, text) {
  const node = document.createElement("div");
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) {
    n /= 1024;
    unit++;
  }
  return `${n.toFixed(n < 10 && unit ? 1 : 0)} ${units[unit]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  return minutes < 120 ? `${minutes} min` : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

// What a rank holds: its layers (a pipeline) or its part of every layer (tensor mode).
export function holding(rank, layerCount) {
  const [start, end] = rank.layers;
  const [index, parts] = rank.shard;
  if (parts > 1) return `part ${index + 1}/${parts} of layers ${start}–${end - 1}`;
  return `layers ${start}–${end - 1}${layerCount ? ` of ${layerCount}` : ""}`;
}

const RING = { cx: 280, cy: 165, radius: 95, node: 26 }; // in the ring's viewBox, 560 x 330
const HOST_CHARS = 18;

// The point of the ring at `angle`.
function onRing(angle) {
  return [RING.cx + RING.radius * Math.cos(angle), RING.cy + RING.radius * Math.sin(angle)];
}

// An arc of the ring from one node to the next, the way the hidden state goes.
function hop(from, to) {
  const gap = (RING.node + 6) / RING.radius;
  const [x1, y1] = onRing(from + gap);
  const [x2, y2] = onRing(to - gap);
  const large = to - from - 2 * gap > Math.PI ? 1 : 0;
  const r = RING.radius;
  return svg("path", {
    d: `M${x1.toFixed(1)},${y1.toFixed(1)} A${r},${r} 0 ${large} 1 ${x2.toFixed(1)},${y2.toFixed(1)}`,
    class: "hop", "marker-end": "url(#arrow)",
  });
}

function drawRing(view) {
  const ring = document.getElementById("ring");
  const n = view.ranks.length;
  const marker = svg("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto",
  });
  marker.append(svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow-head" }));
  const defs = svg("defs");
  defs.append(marker);
  ring.replaceChildren(defs, svg("circle", { cx: RING.cx, cy: RING.cy, r: RING.radius, class: "ring-path" }));
  const angle = (i) => -Math.PI / 2 + (2 * Math.PI * i) / Math.max(n, 1);
  if (n > 1) for (let i = 0; i < n; i++) ring.append(hop(angle(i), angle(i) + (2 * Math.PI) / n));
  const layerCount = Math.max(0, ...view.ranks.map((r) => r.layers[1]));
  view.ranks.forEach((rank, i) => {
    const [x, y] = onRing(angle(i));
    const group = svg("g", { class: `node ${rank.alive ? "alive" : "down"}`, "data-rank": rank.rank });
    group.append(svg("circle", { cx: x, cy: y, r: RING.node }));
    group.append(svg("text", { x, y: y + 6, "text-anchor": "middle", class: "node-rank" }, `${rank.rank}`));
    // Outside the ring: above the top node, below the bottom one, beside the others.
    const side = Math.abs(x - RING.cx) < 1 ? 0 : Math.sign(x - RING.cx);
    const lx = x + side * (RING.node + 8);
    const ly = side ? y - 3 : y + (y < RING.cy ? -RING.node - 22 : RING.node + 16);
    const anchor = { "-1": "end", 0: "middle", 1: "start" }[side];
    const host = rank.host.length > HOST_CHARS ? `${rank.host.slice(0, HOST_CHARS - 1)}…` : rank.host;
    group.append(svg("text", { x: lx, y: ly, "text-anchor": anchor, class: "node-host" }, host));
    group.append(svg("text", { x: lx, y: ly + 16, "text-anchor": anchor, class: "node-layers" },
      holding(rank, layerCount)));
    ring.append(group);
  });
}

function drawCards(view) {
  const layerCount = Math.max(0, ...view.ranks.map((r) => r.layers[1]));
  const cards = view.ranks.map((rank) => {
    const card = div(`card rank ${rank.alive ? "alive" : "down"}`);
    card.dataset.rank = rank.rank;
    const title = div("card-title");
    title.append(div("rank-name", `rank ${rank.rank}`), div("rank-host", rank.host));
    title.append(div(`state ${rank.alive ? "alive" : "down"}`, rank.alive ? "up" : "down"));
    const used = (rank.weights_bytes || 0) + view.load.kv_reserved_bytes;
    const share = rank.memory_total_bytes ? Math.min(used / rank.memory_total_bytes, 1) : 0;
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = 1;
    meter.value = share;
    card.append(
      title,
      div("rank-layers", holding(rank, layerCount)),
      div("line", `memory ${bytes(used)} of ${bytes(rank.memory_total_bytes)}`),
      meter,
      div("line muted", `weights ${bytes(rank.weights_bytes)} · KV ≤ ${bytes(view.load.kv_reserved_bytes)}`),
      div("line", `${rank.device || "?"} · BLAS ${(rank.blas || "?").split(" ")[0]}`),
      // Restarts are the supervisor's: none to show when the ring runs without one.
      div("line muted", `pid ${rank.pid ?? "?"} · up ${duration(Date.now() / 1000 - rank.started_at)}`
        + (rank.restarts === null ? "" : ` · ${rank.restarts} restarts`)),
    );
    return card;
  });
  document.getElementById("ranks").replaceChildren(...cards);
}

function figure(label, value, detail) {
  const node = div("figure");
  node.append(div("figure-value", value), div("figure-label", label));
  if (detail) node.append(div("figure-detail muted", detail));
  return node;
}

function drawFigures(view) {
  const load = view.load;
  const kvShare = load.kv_capacity_bytes ? load.kv_reserved_bytes / load.kv_capacity_bytes : 0;
  const lookups = load.prompt_cache_hits + load.prompt_cache_misses;
  document.getElementById("figures").replaceChildren(
    figure("tokens/s", load.tokens_per_s.toFixed(1), `${load.generated_tokens} generated`),
    figure("active sequences", `${load.active}`, `peak ${load.peak_active}`),
    figure("queue depth", `${load.queue_depth}`),
    figure("KV reserved", `${Math.round(kvShare * 100)}%`,
      `${bytes(load.kv_reserved_bytes)} of ${bytes(load.kv_capacity_bytes)}`),
    figure("prompt-cache hits", `${load.prompt_cache_hits}/${lookups}`,
      load.prompt_cache_tokens === null ? "cache off" : `${load.prompt_cache_tokens} tokens cached`),
    figure("time to first token p50", duration(load.ttft_p50_s)),
  );
}

function drawChart(view) {
  const { bucket_s: bucket, tokens_per_s: rates } = view.load.throughput;
  const chart = document.getElementById("throughput");
  chart.replaceChildren();
  const top = Math.max(1, ...rates);
  const [width, height] = [300, 100];
  const step = rates.length > 1 ? width / (rates.length - 1) : width;
  const points = rates.map((rate, i) => {
    const y = height - (rate / top) * (height - 8);
    return `${(i * step).toFixed(1)},${y.toFixed(1)}`;
  });
  for (const share of [0.25, 0.5, 0.75]) {
    chart.append(svg("line", { x1: 0, x2: width, y1: height * share, y2: height * share, class: "grid" }));
  }
  if (points.length) {
    chart.append(svg("polygon", { points: `0,${height} ${points.join(" ")} ${width},${height}`, class: "area" }));
    chart.append(svg("polyline", { points: points.join(" "), class: "line" }));
  }
  const minutes = Math.round((rates.length * bucket) / 60);
  document.getElementById("throughput-caption").textContent =
    `tokens/s over the last ${minutes} min, per ${bucket} s (top ${top.toFixed(1)})`;
}

function drawHeader(view) {
  const status = document.getElementById("status");
  status.textContent = view.status === "ok" ? "serving" : "unavailable";
  status.className = `pill ${view.status}`;
  status.title = view.reason || "";
  const parts = [view.served_names[0] || view.model, view.mode && `${view.mode} on ${view.ranks.length} rank(s)`,
    view.uptime_s !== null && `up ${duration(view.uptime_s)}`, view.reason].filter(Boolean);
  const summary = document.getElementById("summary");
  summary.textContent = parts.join(" · ");
  summary.title = view.model ? `rank 0 loaded ${view.model}` : "";
}

export function showCluster(view) {
  drawHeader(view);
  drawRing(view);
  drawCards(view);
  drawFigures(view);
  drawChart(view);
}
