// The tasker_core dashboard: a few views over the JSON API, chosen by the URL's hash
// (#/, #/tasks?status=error, #/task/<uuid>). Every URL is relative, so the page works at the
// worker's / and under a Rack mount. Text from the API only ever enters the page as text nodes.
"use strict";

(function () {
  const STATUSES = ["pending", "in_progress", "complete", "error", "cancelled"];
  let session = { actions: false };
  let timer = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "className") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
    }
    return node;
  }

  function flash(message) {
    const box = document.getElementById("flash");
    box.textContent = message || "";
    box.hidden = !message;
  }

  async function api(path, options) {
    const response = await fetch(path, Object.assign({ credentials: "same-origin", cache: "no-store" }, options || {}));
    if (response.status === 401) {
      window.location.href = "login";
      throw new Error("not logged in");
    }
    const body = await response.json().catch(() => ({ error: "HTTP " + response.status }));
    if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
    return body;
  }

  function post(path) {
    return api(path, { method: "POST", headers: { "X-CSRF-Token": session.csrf_token || "" } });
  }

  function statusPill(status) {
    return el("span", { className: "pill status-" + status, "data-status": status }, status.replace(/_/g, " "));
  }

  function time(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    return date.toLocaleString();
  }

  function duration(ms) {
    if (ms === null || ms === undefined) return "—";
    return ms < 1000 ? ms.toFixed(1) + " ms" : (ms / 1000).toFixed(2) + " s";
  }

  function span(seconds) {
    return seconds < 120 ? `${seconds} s` : `${Math.round(seconds / 60)} min`;
  }

  function params() {
    const hash = window.location.hash || "#/";
    const [path, query] = hash.slice(1).split("?");
    return { path: path || "/", query: new URLSearchParams(query || "") };
  }

  function render(...nodes) {
    const main = document.getElementById("main");
    main.replaceChildren(...nodes.flat().filter((node) => node !== null && node !== undefined));
  }

  // A small line chart of steps/s, drawn as inline SVG.
  function chart(points) {
    const width = 560, height = 120, pad = 24;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("class", "chart");
    svg.setAttribute("id", "throughput-chart");
    const max = Math.max(1, ...points.map((p) => p.steps_per_second));
    const span = Math.max(1, points.length - 1);
    const coords = points.map((p, i) => [pad + (i * (width - 2 * pad)) / span, height - pad - (p.steps_per_second / max) * (height - 2 * pad)]);
    const axis = document.createElementNS(ns, "path");
    axis.setAttribute("d", `M ${pad} ${pad} V ${height - pad} H ${width - pad}`);
    axis.setAttribute("class", "axis");
    svg.appendChild(axis);
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", pad + 4);
    label.setAttribute("y", pad - 8);
    label.textContent = `max ${max.toFixed(1)} steps/s`;
    svg.appendChild(label);
    if (coords.length > 1) {
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", coords.map((c) => c.join(",")).join(" "));
      line.setAttribute("class", "line");
      svg.appendChild(line);
    }
    return svg;
  }

  async function overview() {
    const data = await api("api/overview");
    const worker = data.worker;
    const cards = STATUSES.map((status) =>
      el("a", { className: "card count", href: "#/tasks?status=" + status, id: "count-" + status },
        el("span", { className: "number" }, String(data.tasks_by_status[status] || 0)), statusPill(status)));
    const points = data.throughput;
    const latest = points.length ? points[points.length - 1].steps_per_second : 0;
    render(
      el("h1", {}, "Overview"),
      el("section", { className: "counts" }, cards),
      el("section", { className: "grid" },
        el("div", { className: "card" },
          el("h2", {}, "Steps per second"),
          el("p", { className: "big", id: "steps-per-second" }, latest.toFixed(1)),
          chart(points),
          el("p", { className: "muted" }, `this worker, over the last ${span(points.length * data.sample_every_seconds)}, sampled every ${data.sample_every_seconds} s`)),
        el("div", { className: "card" },
          el("h2", {}, "Queue"),
          el("dl", {},
            el("dt", {}, "ready"), el("dd", { id: "queue-ready" }, String(data.queue.ready)),
            el("dt", {}, "waiting for retry"), el("dd", {}, String(data.queue.waiting_for_retry)),
            data.queue.claimed === null ? null : [el("dt", {}, "claimed"), el("dd", {}, String(data.queue.claimed))],
            el("dt", {}, "in flight here"), el("dd", {}, String(data.queue.in_flight)))),
        el("div", { className: "card" },
          el("h2", {}, "Worker"),
          el("dl", { id: "worker" },
            el("dt", {}, "id"), el("dd", {}, worker.worker_id),
            el("dt", {}, "state"), el("dd", {}, worker.state),
            el("dt", {}, "backend"), el("dd", {}, worker.backend),
            el("dt", {}, "handler threads"), el("dd", {}, String(worker.concurrency)),
            el("dt", {}, "steps processed"), el("dd", {}, String(worker.steps_processed)),
            el("dt", {}, "steps failed"), el("dd", {}, String(worker.steps_failed)),
            el("dt", {}, "namespaces"), el("dd", {}, worker.supported_namespaces.join(", ")),
            el("dt", {}, "uptime"), el("dd", {}, Math.round(worker.uptime_seconds) + " s")))));
    if (!data.counts_available) flash("Task counts are not available right now (the database or the engine did not answer).");
    timer = setTimeout(route, 5000);
  }

  async function taskList(query) {
    const filters = {};
    for (const key of ["status", "namespace", "name", "cursor"]) {
      if (query.get(key)) filters[key] = query.get(key);
    }
    const search = new URLSearchParams(Object.assign({ limit: "25" }, filters));
    const page = await api("api/tasks?" + search.toString());
    const statusSelect = el("select", { id: "status-filter", name: "status" },
      el("option", { value: "" }, "any status"),
      STATUSES.map((s) => el("option", { value: s, selected: filters.status === s }, s.replace(/_/g, " "))));
    const form = el("form", { className: "filters", id: "task-filters", onsubmit: (event) => {
      event.preventDefault();
      const next = new URLSearchParams();
      for (const [key, value] of new FormData(event.target)) if (value) next.set(key, value);
      window.location.hash = "#/tasks?" + next.toString();
    } },
    statusSelect,
    el("input", { name: "namespace", placeholder: "namespace", value: filters.namespace || "", id: "namespace-filter" }),
    el("input", { name: "name", placeholder: "template name", value: filters.name || "", id: "name-filter" }),
    el("button", { type: "submit", id: "filter-apply" }, "Filter"));
    const rows = page.tasks.map((task) =>
      el("tr", { className: "task-row", "data-task": task.task_uuid },
        el("td", {}, el("a", { href: "#/task/" + task.task_uuid, className: "task-link" }, task.task_uuid.slice(0, 8))),
        el("td", {}, task.namespace), el("td", {}, task.name + " " + task.version),
        el("td", {}, statusPill(task.status)), el("td", {}, time(task.created_at)), el("td", {}, time(task.completed_at))));
    const older = new URLSearchParams(filters);
    if (page.next_cursor) older.set("cursor", page.next_cursor);
    const newest = new URLSearchParams(filters);
    newest.delete("cursor");
    render(
      el("h1", {}, "Tasks"),
      form,
      el("table", { id: "tasks" },
        el("thead", {}, el("tr", {}, ["task", "namespace", "template", "status", "created", "finished"].map((h) => el("th", {}, h)))),
        el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 6, className: "muted" }, "No task matches.")))),
      el("p", { className: "paging" },
        filters.cursor ? el("a", { href: "#/tasks?" + newest.toString(), id: "page-newest" }, "« newest") : null,
        page.next_cursor ? el("a", { href: "#/tasks?" + older.toString(), id: "page-older" }, "older »") : null));
  }

  async function taskPage(uuid) {
    const task = await api("api/tasks/" + encodeURIComponent(uuid));
    const buttons = [];
    if (session.actions && (task.status === "pending" || task.status === "in_progress")) {
      buttons.push(el("button", { id: "cancel-button", className: "danger", onclick: () => act(uuid, "cancel") }, "Cancel task"));
    }
    if (session.actions && (task.status === "error" || task.status === "cancelled")) {
      buttons.push(el("button", { id: "retry-button", onclick: () => act(uuid, "retry") }, "Retry task"));
    }
    const steps = task.steps.map((step) =>
      el("tr", { className: "step-row", "data-step": step.name, "data-status": step.status },
        el("td", {}, step.name), el("td", {}, statusPill(step.status)), el("td", {}, String(step.attempts)),
        el("td", {}, duration(step.duration_ms)),
        el("td", { className: "error-message" }, step.error_message || ""),
        el("td", {}, step.result === null || step.result === undefined ? "" : el("pre", {}, JSON.stringify(step.result, null, 1)))));
    render(
      el("h1", {}, `${task.namespace}/${task.name} ${task.version} `, el("span", { id: "task-status" }, statusPill(task.status))),
      el("p", { className: "muted" }, `task ${task.task_uuid} · created ${time(task.created_at)} · finished ${time(task.completed_at)}`),
      el("div", { className: "actions" }, buttons),
      el("div", { className: "card graph" },
        el("img", { id: "task-graph", alt: "the steps of this task and their states", src: `api/tasks/${encodeURIComponent(uuid)}/graph.svg?at=${Date.now()}` })),
      task.steps_retained ? null : el("p", { className: "muted" }, "Only the final status of this task is still kept; its steps are gone."),
      el("table", { id: "steps" },
        el("thead", {}, el("tr", {}, ["step", "status", "attempts", "duration", "error", "result"].map((h) => el("th", {}, h)))),
        el("tbody", {}, steps)));
    if (task.status === "pending" || task.status === "in_progress") timer = setTimeout(route, 1000);
  }

  async function act(uuid, action) {
    try {
      await post(`api/tasks/${encodeURIComponent(uuid)}/${action}`);
      flash("");
    } catch (error) {
      flash(`${action} failed: ${error.message}`);
    }
    route();
  }

  async function route() {
    clearTimeout(timer);
    const { path, query } = params();
    document.getElementById("nav-overview").classList.toggle("active", path === "/");
    document.getElementById("nav-tasks").classList.toggle("active", path.startsWith("/task"));
    try {
      if (path === "/") await overview();
      else if (path === "/tasks") await taskList(query);
      else if (path.startsWith("/task/")) await taskPage(decodeURIComponent(path.slice(6)));
      else render(el("p", {}, "No such page."));
    } catch (error) {
      flash(error.message);
    }
  }

  async function start() {
    try {
      session = await api("api/session");
      const status = await api("status");
      const pill = document.getElementById("worker-state");
      pill.textContent = status.state;
      pill.className = "pill state-" + status.state;
    } catch (error) {
      flash(error.message);
    }
    window.addEventListener("hashchange", () => { flash(""); route(); });
    route();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
