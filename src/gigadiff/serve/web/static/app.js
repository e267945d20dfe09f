// gigadiff serve's page: queue jobs, follow them (server-sent events with previews), view outputs in Deep Zoom.
"use strict";

const FORM_FIELDS = ["prompt", "negative", "model", "size", "scheduler", "coherence"];
const NUMBER_FIELDS = ["steps", "seed", "guidance", "strength"];
const FINISHED = ["done", "failed", "cancelled"];
const cards = new Map(); // job id -> {element, source}
let viewer = null;
let shownJob = null;

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (response.status === 401) location.href = "/login";
  if (!response.ok) throw new Error(body?.error || `${response.status} ${response.statusText}`);
  return body;
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// The job as the API takes it: images as data URLs, LoRAs as a list, a ControlNet as NAME=IMAGE[:SCALE].
async function jobRequest(form) {
  const data = {};
  for (const name of FORM_FIELDS) {
    const value = form.elements[name].value.trim();
    if (value) data[name] = value;
  }
  for (const name of NUMBER_FIELDS) {
    const value = form.elements[name].value.trim();
    if (value) data[name] = Number(value);
  }
  const init = form.elements.init.files[0];
  if (init) data.init = await dataUrl(init);
  const loras = form.elements.lora.value.split(",").map((item) => item.trim()).filter(Boolean);
  if (loras.length) data.lora = loras;
  const controlModel = form.elements.control_model.value.trim();
  const controlImage = form.elements.control_image.files[0];
  if (controlModel || controlImage) {
    if (!controlModel || !controlImage) throw new Error("ControlNet: give both the ControlNet and its control image");
    const scale = form.elements.control_scale.value.trim();
    data.control = [`${controlModel}=${await dataUrl(controlImage)}` + (scale ? `:${Number(scale)}` : "")];
  }
  const extra = form.elements.extra.value.trim();
  if (extra) {
    let parsed;
    try { parsed = JSON.parse(extra); } catch (e) { throw new Error(`More options: not valid JSON (${e.message})`); }
    Object.assign(data, parsed);
  }
  return data;
}

async function submitJob(event) {
  event.preventDefault();
  const error = document.getElementById("form-error");
  error.textContent = "";
  try {
    const data = await jobRequest(event.target);
    const job = await api("/api/jobs", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(data),
    });
    await refresh();
    follow(job.id);
  } catch (e) {
    error.textContent = e.message;
  }
}

function describe(job) {
  const r = job.request;
  const size = r.size || "default size";
  return `${r.model || "sd15"} · ${size} · seed ${r.seed ?? 0} · ${job.id.slice(0, 8)}`;
}

function eta(seconds) {
  if (seconds == null) return "";
  const s = Math.round(seconds);
  return s >= 60 ? ` · ${Math.floor(s / 60)} min ${s % 60} s left` : ` · ${s} s left`;
}

function render(job) {
  let card = cards.get(job.id);
  if (!card) {
    const element = document.getElementById("job-template").content.firstElementChild.cloneNode(true);
    element.dataset.id = job.id;
    element.querySelector(".cancel").addEventListener("click", () => cancel(job.id));
    element.querySelector(".view").addEventListener("click", () => view(job.id));
    card = {element, source: null};
    cards.set(job.id, card);
  }
  const e = card.element;
  e.dataset.status = job.status;
  e.querySelector(".status").textContent = job.status;
  e.querySelector(".prompt").textContent = job.request.prompt || "(no prompt)";
  e.querySelector(".meta").textContent = describe(job);
  const bar = e.querySelector("progress");
  // Tiles count every model call still to come, so a one-step job's bar moves too; steps before tiles are known.
  bar.max = job.tiles_total ? job.tiles_total : Math.max(job.steps, 1);
  bar.value = job.status === "done" ? bar.max : job.tiles_total ? job.tiles : job.step;
  let detail = job.phase || "";
  if (job.status === "running" && job.steps) {
    const step = Math.min(job.step + 1, job.steps);
    detail = `step ${step}/${job.steps} · ${job.tiles}/${job.tiles_total} tiles${eta(job.eta)}` + (job.phase ? ` · ${job.phase}` : "");
  }
  if (job.status === "running" && job.runs_on) detail += ` · on ${job.runs_on}`;
  if (job.status === "queued") detail = "waiting for a worker";
  if (job.status === "failed") detail = job.error || "failed";
  if (job.status === "done") detail = `done · ${job.outputs.join(", ")}`;
  const detailElement = e.querySelector(".detail");
  detailElement.textContent = detail;
  detailElement.classList.toggle("error", job.status === "failed");
  e.querySelector(".cancel").hidden = FINISHED.includes(job.status);
  e.querySelector(".view").hidden = !job.dzi;
  if (job.status === "running" && !card.source) follow(job.id);
  return e;
}

function follow(id) {
  const card = cards.get(id);
  if (card?.source) return;
  const source = new EventSource(`/api/jobs/${id}/events`);
  source.addEventListener("progress", (m) => render(JSON.parse(m.data)));
  source.addEventListener("preview", (m) => {
    const data = JSON.parse(m.data);
    const img = cards.get(id)?.element.querySelector(".preview");
    if (img) { img.src = data.image; img.hidden = false; img.title = `step ${data.step}`; }
  });
  source.addEventListener("end", (m) => { render(JSON.parse(m.data)); source.close(); cards.get(id).source = null; });
  source.onerror = () => { source.close(); if (cards.get(id)) cards.get(id).source = null; };
  if (card) card.source = source;
}

async function cancel(id) {
  try { await api(`/api/jobs/${id}`, {method: "DELETE"}); } catch (e) { alert(e.message); }
  await refresh();
}

async function view(id) {
  const job = await api(`/api/jobs/${id}`);
  const panel = document.getElementById("viewer-panel");
  panel.hidden = false;
  shownJob = id;
  document.getElementById("viewer-title").textContent = job.request.prompt || job.id;
  const table = document.getElementById("parameters");
  table.replaceChildren(...Object.entries(job.request).map(([key, value]) => {
    const row = document.createElement("tr");
    const name = document.createElement("th");
    const cell = document.createElement("td");
    name.textContent = key;
    cell.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    row.append(name, cell);
    return row;
  }));
  const links = document.getElementById("downloads");
  links.replaceChildren(...job.outputs.map((name, i) => {
    const a = document.createElement("a");
    a.href = i === 0 ? `/api/jobs/${id}/image` : `/api/jobs/${id}/files/${name}`;
    a.textContent = name;
    a.download = "";
    return a;
  }));
  if (typeof OpenSeadragon === "undefined") {
    document.getElementById("viewer-missing").hidden = false;
    return;
  }
  if (!viewer) {
    viewer = OpenSeadragon({
      id: "viewer", prefixUrl: "/vendor/openseadragon/images/", showNavigator: true,
      maxZoomPixelRatio: 4, crossOriginPolicy: false, loadTilesWithAjax: true,
    });
  }
  viewer.open(job.dzi);
  panel.scrollIntoView({behavior: "smooth"});
}

async function refresh() {
  let listing;
  try { listing = await api("/api/jobs"); } catch (e) { return; }
  const queue = document.getElementById("queue");
  queue.replaceChildren(...listing.jobs.map(render));
  const counts = Object.entries(listing.counts).map(([k, v]) => `${v} ${k}`).join(" · ");
  document.getElementById("counts").textContent = counts || "no jobs yet";
}

async function loadModels() {
  try {
    const models = await api("/api/models");
    document.getElementById("models").replaceChildren(...[...models.builtin, ...models.presets, ...models.local].map((name) => {
      const option = document.createElement("option");
      option.value = name;
      return option;
    }));
  } catch (e) { /* the field still takes any name */ }
}

document.getElementById("job-form").addEventListener("submit", submitJob);
loadModels();
refresh();
setInterval(refresh, 2000);
window.gigadiff = {view, refresh, shownJob: () => shownJob, viewer: () => viewer};
