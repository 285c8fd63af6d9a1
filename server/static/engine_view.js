// The live view of the engine: polls GET /engine/state and draws the KV block pool (one cell per
// block, or per group of blocks in a big pool), the request counts, and step time and batch size
// over the last minute.

import { AuthRequired, apiFetch } from "./api.js";

const STATES = ["free", "cached", "in_use", "shared"];
const POLL_MS = 250;

function cssColor(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(`--${name}`).trim();
}

export class EngineView {
  constructor(onAuthRequired) {
    this.onAuthRequired = onAuthRequired;
    this.pool = document.getElementById("pool");
    this.colors = STATES.map(cssColor);
    this.timer = null;
  }

  start() {
    if (this.timer === null) this.timer = setInterval(() => this.refresh(), POLL_MS);
    this.refresh();
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async refresh() {
    let state;
    try {
      const response = await apiFetch("/engine/state", { cache: "no-store" });
      if (!response.ok) return;
      state = await response.json();
    } catch (e) {
      if (e instanceof AuthRequired) this.onAuthRequired();  // else a network blip: retry

      return;
    }
    this.draw(state);
  }

  draw(state) {
    this.drawPool(state.cells);
    this.pool.dataset.cells = state.cells;  // what the canvas shows, for tests and tools
    const per = state.blocks_per_cell;
    document.getElementById("pool-caption").textContent =
      `${state.num_blocks} blocks of ${state.block_size} tokens` +
      (per > 1 ? `, ${per} blocks per cell (a cell shows its busiest block)` : "");
    for (const name of STATES) {
      document.getElementById(`count-${name}`).textContent = state.counts[name];
    }
    document.getElementById("num-running").textContent = state.num_running;
    document.getElementById("num-waiting").textContent = state.num_waiting;
    document.getElementById("kv-usage").textContent = `${(100 * state.kv_cache_usage).toFixed(1)}%`;
    const list = document.getElementById("running-list");
    list.replaceChildren(...state.running.map((r) => {
      const li = document.createElement("li");
      li.textContent = `${r.id}: ${r.tokens} tokens in ${r.blocks} blocks`;
      return li;
    }));
    const since = state.time - 60;
    const points = state.history.filter((h) => h.t > since);
    drawChart(document.getElementById("step-chart"), points, "step_ms", since, cssColor("in_use"));
    drawChart(document.getElementById("batch-chart"), points, "batch", since, cssColor("shared"));
  }

  drawPool(cells) {
    const n = cells.length;
    const columns = Math.max(1, Math.ceil(Math.sqrt(n * 2)));
    const rows = Math.max(1, Math.ceil(n / columns));
    const size = Math.max(2, Math.floor(Math.min(this.pool.clientWidth || 480, 960) / columns));
    this.pool.width = columns * size;
    this.pool.height = rows * size;
    const ctx = this.pool.getContext("2d");
    const gap = size > 4 ? 1 : 0;
    for (let i = 0; i < n; i++) {
      ctx.fillStyle = this.colors[cells.charCodeAt(i) - 48];
      ctx.fillRect((i % columns) * size, Math.floor(i / columns) * size, size - gap, size - gap);
    }
  }
}

// A line of one field over the last minute, with its largest value written in the corner.
function drawChart(canvas, points, field, since, color) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  if (!points.length) return;
  const top = Math.max(...points.map((p) => p[field])) || 1;
  ctx.strokeStyle = color;
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach((p, i) => {
    const x = ((p.t - since) / 60) * width;
    const y = height - 4 - (p[field] / top) * (height - 16);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#6b7480";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(`max ${top.toFixed(1)}`, 4, 11);
}
