// The cxr-embed page: plain JS, no build step, talks to this server only (relative URLs).
"use strict";

const TOKEN_KEY = "cxr-embed-token";
const $ = (sel, root = document) => root.querySelector(sel);
const tokenInput = $("#token");
let info = null;  // GET /info: model, probes, store

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function authHeaders() {
  const token = tokenInput.value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

// One API call; a file goes as a multipart form (the server reads DICOM, PNG and JPEG by their bytes).
async function api(path, file) {
  const init = { method: file ? "POST" : "GET", headers: authHeaders() };
  if (file) {
    init.body = new FormData();
    init.body.append("files", file, file.name);
  }
  let reply;
  try {
    reply = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network", "the server could not be reached: " + err.message);
  }
  if (reply.ok) return reply;
  let body = null;
  try { body = await reply.json(); } catch (_) { /* not JSON */ }
  const error = body && body.error ? body.error : { code: "http_" + reply.status, message: reply.statusText };
  throw new ApiError(reply.status, error.code, `${error.message} (HTTP ${reply.status})`);
}

function setStatus(text, needsToken = false) {
  $("#status").textContent = text;
  tokenInput.closest("label").classList.toggle("needed", needsToken);
}

async function loadInfo() {
  try {
    info = await (await api("info")).json();
  } catch (err) {
    info = null;
    if (err.status === 401) return setStatus("This server needs its access token: enter it above.", true);
    if (err.status === 503) { setStatus("The model is loading…"); return setTimeout(loadInfo, 2000); }
    return setStatus("Error: " + err.message);
  }
  const m = info.model;
  $("#model").textContent = `${m.model_name} · ${m.dim}-d · ${m.preprocess_version}`;
  const probes = Object.keys(info.probes);
  const store = info.store ? `a store of ${info.store.images} images` : "no store";
  setStatus(`Ready: ${probes.length} probe(s)${probes.length ? " (" + probes.join(", ") + ")" : ""}, ${store}.`);
}

function cell(row, content, className) {
  const td = row.insertCell();
  if (content instanceof Node) td.append(content); else td.textContent = content;
  if (className) td.className = className;
  return td;
}

function addError(card, message) {
  const list = $(".errors", card);
  if ([...list.children].some((li) => li.textContent === message)) return;  // /preview and /predict agree
  const li = document.createElement("li");
  li.textContent = message;
  list.append(li);
}

function scoreBar(score) {
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("div");
  fill.className = "fill" + (score.positive ? " positive" : "");
  fill.style.width = (100 * score.probability).toFixed(1) + "%";
  const mark = document.createElement("div");
  mark.className = "mark";
  mark.style.left = (100 * score.threshold).toFixed(1) + "%";
  mark.title = "threshold " + score.threshold.toFixed(3);
  bar.append(fill, mark);
  return bar;
}

function showScores(card, scores) {
  const table = $(".scores", card);
  for (const [name, s] of Object.entries(scores || {})) {
    const row = $("tbody", table).insertRow();
    row.dataset.probe = name;
    cell(row, name);
    if (s.probability !== null && s.probability !== undefined) {
      cell(row, scoreBar(s));
      const verdict = `${s.probability.toFixed(3)} ${s.positive ? "≥" : "<"} ${s.threshold.toFixed(3)}: ${s.positive ? "positive" : "negative"}`;
      cell(row, verdict + (s.reliable ? "" : " (unreliable)"), s.reliable ? "" : "unreliable");
    } else {
      cell(row, s.classes.map((c, i) => `${c}: ${s.probabilities[i].toFixed(3)}`).join(", "));
      cell(row, `predicted ${s.predicted}` + (s.reliable ? "" : " (unreliable)"), s.reliable ? "" : "unreliable");
    }
  }
  table.classList.toggle("filled", table.tBodies[0].rows.length > 0);
}

function showFindings(card, f) {
  const size = f.original_size ? `${f.original_size[1]}×${f.original_size[0]} px` : "";
  const parts = [f.source_format && f.source_format.toUpperCase(), f.modality, f.body_part, f.view_position, size];
  $(".findings", card).textContent = parts.filter(Boolean).join(" · ");
}

function showVerdict(card, check) {
  const p = $(".verdict", card);
  const by = ` (checked by ${check.checked_by.join(" and ")})`;
  if (check.is_frontal_cxr) {
    p.textContent = "Frontal chest radiograph" + by;
    p.className = "verdict ok";
  } else {
    p.textContent = "Not a frontal chest radiograph: " + check.reasons.join("; ") + by + ". Scores are unreliable.";
    p.className = "verdict bad";
  }
}

async function predict(card, file) {
  const result = (await (await api("predict", file)).json()).results[0];
  if (!result.ok) throw new ApiError(result.error.status, result.error.code, `${result.error.message} (HTTP ${result.error.status})`);
  showFindings(card, result.findings);
  showVerdict(card, result.chest_check);
  showScores(card, result.scores);
}

async function preview(card, file) {
  const blob = await (await api("preview", file)).blob();
  const img = $(".preview img", card);
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("the preview could not be shown"));
    img.src = URL.createObjectURL(blob);
  });
}

async function search(card, file) {
  const result = (await (await api("search?k=5", file)).json()).results[0];
  if (!result.ok) return;  // predict reports the error
  const table = $(".neighbours", card);
  for (const n of result.neighbours) {
    const row = $("tbody", table).insertRow();
    const meta = n.metadata ? " " + Object.entries(n.metadata).map(([k, v]) => `${k}=${v}`).join(", ") : "";
    cell(row, n.image_id + meta);
    cell(row, n.distance.toFixed(4));
    cell(row, n.similarity.toFixed(4));
  }
  table.classList.toggle("filled", result.neighbours.length > 0);
}

async function analyse(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  $(".name", card).textContent = file.name;
  $("#results").prepend(card);
  const steps = [preview(card, file), predict(card, file)];
  if (info && info.store) steps.push(search(card, file));
  for (const outcome of await Promise.allSettled(steps)) {
    if (outcome.status === "rejected") addError(card, outcome.reason.message);
  }
  card.dataset.state = $(".errors", card).children.length ? "failed" : "done";
}

async function analyseAll(files) {
  if (!info) await loadInfo();
  for (const file of files) await analyse(file);  // one at a time: the server batches across users
}

function wire() {
  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
  tokenInput.addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim());
    loadInfo();
  });
  const input = $("#files");
  input.addEventListener("change", () => { analyseAll([...input.files]); input.value = ""; });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    analyseAll([...e.dataTransfer.files]);
  });
  loadInfo();
}

wire();
