// watcher's page: fills the overview and the file list from the JSON API and keeps them live with the
// server-sent events of /api/events; buttons call the same actions as `watcher retry` and `watcher pause`.
"use strict";

const page = document.body.dataset.page;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (r.status === 401) { location.href = "/login"; throw new Error("not logged in"); }
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function post(url, body) {
  const r = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const answer = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(answer.detail || `HTTP ${r.status}`);
  return answer;
}

function fileLink(path) {
  return el("a", { href: "/file?path=" + encodeURIComponent(path) }, path);
}

const fmt = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

function fileRow(f) {
  const key = f.key ? `${f.key} ${f.scale || ""}`.trim() : "–";
  return el("tr", { class: "state-" + f.state, "data-path": f.path, "data-state": f.state },
    el("td", { class: "path" }, fileLink(f.path)),
    el("td", { class: "state" }, f.state),
    el("td", {}, key), el("td", {}, fmt(f.bpm)), el("td", {}, fmt(f.integrated_lufs)));
}

function fill(tbody, rows) { tbody.replaceChildren(...rows); }

function actionButton(label, action) {
  const b = el("button", { type: "button" }, label);
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await action(); await refresh(); } catch (e) { alert(e.message); } finally { b.disabled = false; }
  });
  return b;
}

// -- overview --------------------------------------------------------------------------------------

async function loadOverview() {
  const report = await getJSON("/api/status");
  const away = report.store_unreachable;
  const listing = away ? { files: [] } : await getJSON("/api/files");
  const problems = [];
  if (away) {
    problems.push(el("div", { class: "card problem store-away", role: "alert" },
      el("div", { class: "label" }, `Store unreachable since ${away.unreachable_since || "now"}`),
      el("div", { class: "error" }, away.error || ""),
      el("div", {}, away.next || "claims paused; paid answers are kept in the journal and recorded when it is back")));
  }
  for (const d of report.in_doubt) {
    problems.push(el("div", { class: "card problem state-in_doubt", "data-path": d.path },
      el("div", { class: "label" }, `${d.pipeline} ${d.operation || ""} in doubt since ${d.since || "?"}`),
      fileLink(d.path),
      actionButton("Send again (may be billed twice)", () => post("/api/retry", { paths: [d.path], in_doubt: true }))));
  }
  for (const p of report.problems.filter((p) => p.state !== "in_doubt")) {
    problems.push(el("div", { class: "card problem state-" + p.state, "data-path": p.path },
      el("div", { class: "label" }, `${p.pipeline} ${p.state} at ${p.step} (${p.attempts} attempts)`),
      fileLink(p.path), el("div", { class: "error" }, `${p.error_code}: ${p.error}`),
      actionButton("Retry", () => post("/api/retry", { paths: [p.path] }))));
  }
  document.getElementById("problems").replaceChildren(
    ...(problems.length ? problems : [el("p", { class: "muted" }, "Nothing needs attention.")]));
  fill(document.querySelector("#folders tbody"), report.folders.map((f) => {
    const state = f.paused ? "paused" : f.available === false ? "unavailable" : "active";
    const toggle = f.paused
      ? actionButton("Resume", () => post("/api/resume", { folder: f.folder }))
      : actionButton("Pause", () => post("/api/pause", { folder: f.folder }));
    return el("tr", { class: "folder-" + state, "data-folder": f.folder },
      el("td", { class: "path" }, f.folder), el("td", {}, f.mode ? `${f.mode} (${f.reason || ""})` : "–"),
      el("td", { class: "state" }, state), el("td", {}, toggle));
  }));
  const counts = [];
  for (const [pipeline, states] of Object.entries(report.counts)) {
    counts.push(el("div", { class: "card" }, el("div", { class: "label" }, pipeline),
      ...Object.entries(states).map(([s, n]) => el("div", { class: "state-" + s }, `${s} ${n}`))));
  }
  document.getElementById("counts").replaceChildren(
    ...(counts.length ? counts : [el("p", { class: "muted" }, "No files recorded yet.")]));
  const backlog = [];
  for (const [pipeline, b] of Object.entries(report.backlog || {})) {
    const eta = !b.waiting ? "nothing waiting" : b.eta ? `done about ${b.eta}${b.capped ? " (daily cap)" : ""}`
      : "done: unknown (nothing finished lately)";
    backlog.push(el("div", { class: "card" + (b.capped ? " capped" : ""), "data-pipeline": pipeline },
      el("div", { class: "label" }, pipeline), `${b.waiting} waiting`,
      el("div", { class: "muted" }, `${b.rate_per_minute}/min over ${b.window_minutes} min`), el("div", {}, eta)));
  }
  document.getElementById("backlog").replaceChildren(
    ...(backlog.length ? backlog : [el("p", { class: "muted" }, "Nothing waiting.")]));
  const spend = [];
  for (const service of ["analysis", "processing"]) {
    const s = report.spend[service];
    if (!s) continue;
    const cap = s.cap_minutes ? ` of ${s.cap_minutes} (daily cap)` : " (no cap)";
    spend.push(el("div", { class: "card" + (s.capped_at ? " capped" : "") }, el("div", { class: "label" }, service),
      `${s.minutes_today} audio min${cap}`, el("div", { class: "muted" }, `${s.paid_calls_today} paid calls`)));
  }
  document.getElementById("spend").replaceChildren(...spend);
  const nodes = report.nodes || [];
  document.getElementById("nodes-section").hidden = nodes.length === 0;
  document.getElementById("nodes").replaceChildren(...nodes.map((n) => el("li", {},
    `${n.name} (watcher ${n.version}): last heartbeat ${n.seconds_since_heartbeat} s ago, ${n.jobs_held} job(s) held`)));
  fill(document.querySelector("#files tbody"), listing.files.map(fileRow));
}

// -- file list -------------------------------------------------------------------------------------

let pageNo = 1;
async function loadFiles() {
  const form = document.getElementById("filters");
  const params = new URLSearchParams();
  for (const [k, v] of new FormData(form)) if (v) params.set(k, v);
  params.set("page", pageNo);
  const listing = await getJSON("/api/files?" + params);
  fill(document.querySelector("#files tbody"), listing.files.map(fileRow));
  document.getElementById("total").textContent = `${listing.total}${listing.capped ? "+" : ""} file(s)`;
  document.getElementById("pageno").textContent = `page ${listing.page} of ${listing.pages}`;
  document.getElementById("prev").disabled = listing.page <= 1;
  document.getElementById("next").disabled = listing.page >= listing.pages;
}

// -- file page -------------------------------------------------------------------------------------

function setupFile() {
  const button = document.getElementById("retry");
  if (button) {
    button.addEventListener("click", async () => {
      button.disabled = true;
      const inDoubt = document.getElementById("state").textContent === "in_doubt";
      try {
        const r = await post("/api/retry", { paths: [button.dataset.path], in_doubt: inDoubt });
        button.textContent = `Retrying (${r.retried} job(s))`;
      } catch (e) { button.disabled = false; alert(e.message); }
    });
  }
}

// -- live ------------------------------------------------------------------------------------------

let pending = null;
async function refresh() {
  if (page === "overview") await loadOverview();
  else if (page === "files") await loadFiles();
}
function soon() {
  if (pending) return;
  pending = setTimeout(async () => { pending = null; try { await refresh(); } catch (e) { console.warn(e); } }, 50);
}

function live() {
  const badge = document.getElementById("live");
  const source = new EventSource("/api/events");
  source.onopen = () => { badge.textContent = "live"; badge.classList.add("on"); };
  source.onerror = () => { badge.textContent = "offline"; badge.classList.remove("on"); };
  for (const type of ["settled", "step", "done", "failed", "in_doubt", "spend", "capped"]) {
    source.addEventListener(type, (e) => {
      const msg = JSON.parse(e.data);
      if (page === "file") {
        if (msg.path === document.body.dataset.path && type !== "spend") location.reload();
      } else soon();
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  if (page === "files") {
    document.getElementById("filters").addEventListener("submit", (e) => { e.preventDefault(); pageNo = 1; soon(); });
    document.getElementById("prev").addEventListener("click", () => { pageNo -= 1; soon(); });
    document.getElementById("next").addEventListener("click", () => { pageNo += 1; soon(); });
  }
  if (page === "file") setupFile();
  refresh().catch((e) => console.warn(e));
  live();
});
