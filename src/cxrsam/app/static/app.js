// cxrsam web app: upload an X-ray, draw the lung mask, refine it with clicks or a dragged box.
// Prompts are kept here (box, points, labels in original image pixels) and sent whole on each
// change; the server decodes them against the image embedding it cached at upload.
"use strict";

const $ = (id) => document.getElementById(id);
const view = $("view");
const ctx = view.getContext("2d");
const MASK_RGBA = [255, 64, 64, 100];
const UNCERTAINTY_RGB = [255, 220, 0];  // disagreement shown in yellow, opacity = disagreement
const DRAG_MIN_CSS_PX = 5;

let image = null;          // HTMLImageElement of the upload (grey PNG rendered by the server)
let maskLayer = null;      // offscreen canvas with the tinted mask, or null
let uncertaintyLayer = null;  // offscreen canvas with the prompt-disagreement map, or null
let imageId = null;
let prompts = { box: null, points: [], labels: [] };
let history = [];
let drag = null;           // {x0, y0, x1, y1, cssStart: [x, y]} while the pointer is down
let requestSeq = 0;

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = kind;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not show the image"));
    img.src = src;
  });
}

async function apiJson(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail;
    const text = typeof detail === "string" ? detail : JSON.stringify(detail || response.statusText);
    throw new Error(`${response.status}: ${text}`);
  }
  return body;
}

// Tint the mask and count its pixels (the count is exposed in the page for users and tests).
// A PNG data URL as a canvas layer whose pixels ``recolour(rgba, offset)`` rewrites in place.
async function recolouredLayer(dataUrl, recolour) {
  const img = await loadImage(dataUrl);
  const layer = document.createElement("canvas");
  layer.width = img.naturalWidth;
  layer.height = img.naturalHeight;
  const lctx = layer.getContext("2d");
  lctx.drawImage(img, 0, 0);
  const data = lctx.getImageData(0, 0, layer.width, layer.height);
  for (let i = 0; i < data.data.length; i += 4) recolour(data.data, i);
  lctx.putImageData(data, 0, 0);
  return layer;
}

async function setMask(dataUrl) {
  if (!dataUrl) {
    maskLayer = null;
    return 0;
  }
  let count = 0;
  maskLayer = await recolouredLayer(dataUrl, (rgba, i) => {
    if (rgba[i] > 127) {
      count += 1;
      rgba.set(MASK_RGBA, i);
    } else {
      rgba[i + 3] = 0;
    }
  });
  return count;
}

// The grey disagreement map (255 = most) as a yellow layer whose opacity follows the disagreement.
async function setUncertainty(dataUrl) {
  if (!dataUrl) {
    uncertaintyLayer = null;
    return;
  }
  uncertaintyLayer = await recolouredLayer(dataUrl, (rgba, i) => {
    const value = rgba[i];
    rgba.set(UNCERTAINTY_RGB, i);
    rgba[i + 3] = Math.round(value * 0.8);
  });
}

function draw() {
  if (!image) return;
  ctx.clearRect(0, 0, view.width, view.height);
  ctx.drawImage(image, 0, 0);
  if (maskLayer && $("show-mask").checked) ctx.drawImage(maskLayer, 0, 0);
  if (uncertaintyLayer && $("show-uncertainty").checked) ctx.drawImage(uncertaintyLayer, 0, 0);
  const line = Math.max(1, Math.round(Math.max(view.width, view.height) / 300));
  ctx.lineWidth = line;
  const box = drag && drag.moved ? [drag.x0, drag.y0, drag.x1, drag.y1] : prompts.box;
  if (box) {
    ctx.strokeStyle = "#ffdc00";
    ctx.strokeRect(Math.min(box[0], box[2]), Math.min(box[1], box[3]),
                   Math.abs(box[2] - box[0]), Math.abs(box[3] - box[1]));
  }
  prompts.points.forEach(([x, y], i) => {
    ctx.fillStyle = prompts.labels[i] === 1 ? "#00c800" : "#2878ff";
    ctx.beginPath();
    ctx.arc(x, y, 2 * line + 2, 0, 2 * Math.PI);
    ctx.fill();
  });
}

function fmtArea(area) {
  if (!area) return "-";
  return area.mm2 === null ? `${area.pixels} px` : `${area.pixels} px (${(area.mm2 / 100).toFixed(1)} cm²)`;
}

async function showState(state) {
  const count = await setMask(state.mask);
  const counter = $("mask-pixels");
  counter.textContent = state.mask ? String(count) : "-";
  counter.dataset.count = String(count);
  counter.dataset.version = String(Number(counter.dataset.version) + 1);
  const result = state.result;
  $("area").textContent = result ? fmtArea(result.area.total) : "-";
  const lungs = result && result.area.lungs;
  $("sides").textContent = lungs ? `${fmtArea(lungs.image_left)} / ${fmtArea(lungs.image_right)}`
                                 : (result ? "not separable" : "-");
  $("prompt-source").textContent = result ? result.prompt_source : "-";
  const quality = $("quality");
  quality.textContent = state.quality || "-";
  quality.dataset.status = state.quality || "";
  const reasons = $("reasons");
  reasons.replaceChildren(...((result && result.quality) ? result.quality.reasons : []).map((reason) => {
    const item = document.createElement("li");
    item.textContent = reason.message;
    item.dataset.flag = reason.flag;
    return item;
  }));
  await setUncertainty(state.uncertainty);
  const toggle = $("show-uncertainty");
  toggle.disabled = !state.uncertainty;
  $("uncertainty").textContent = result && result.uncertainty ? result.uncertainty.max.toFixed(3) : "-";
  $("download-seg").hidden = !state.dicom;
  for (const [id, file] of [["download-mask", "mask.png"], ["download-json", "result.json"],
                            ["download-seg", "seg.dcm"]]) {
    const link = $(id);
    link.classList.toggle("disabled", !result);
    if (result) link.href = `/api/images/${imageId}/${file}`; else link.removeAttribute("href");
  }
  draw();
  if (state.message) setStatus(state.message);
  else setStatus(result ? "Click to add points, drag to draw a box." : "Drag a box around the lungs.");
}

async function refine() {
  const seq = ++requestSeq;
  setStatus("segmenting", "busy");
  draw();
  try {
    const state = await apiJson(`/api/images/${imageId}/segment`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(prompts),
    });
    if (seq === requestSeq) await showState(state);
  } catch (err) {
    if (seq === requestSeq) setStatus(err.message, "error");
  }
}

function changePrompts(update) {
  history.push(JSON.parse(JSON.stringify(prompts)));
  update();
  $("undo").disabled = false;
  refine();
}

async function upload(file) {
  const form = new FormData();
  form.append("file", file);
  setStatus(`uploading ${file.name}`, "busy");
  try {
    const body = await apiJson("/api/images", { method: "POST", body: form });
    image = await loadImage(body.image);
    imageId = body.id;
    prompts = { box: null, points: [], labels: [] };
    history = [];
    view.width = body.width;
    view.height = body.height;
    view.hidden = false;
    $("undo").disabled = true;
    $("reset").disabled = false;
    await showState(body);
  } catch (err) {
    setStatus(err.message, "error");
  }
}

function imageXY(event) {
  const rect = view.getBoundingClientRect();
  const x = (event.clientX - rect.left) * view.width / rect.width;
  const y = (event.clientY - rect.top) * view.height / rect.height;
  return [Math.min(view.width - 1, Math.max(0, Math.round(x))), Math.min(view.height - 1, Math.max(0, Math.round(y)))];
}

view.addEventListener("contextmenu", (event) => event.preventDefault());

view.addEventListener("pointerdown", (event) => {
  if (!imageId) return;
  const [x, y] = imageXY(event);
  drag = { x0: x, y0: y, x1: x, y1: y, moved: false, css: [event.clientX, event.clientY],
           background: event.button === 2 || event.shiftKey };
  view.setPointerCapture(event.pointerId);
});

view.addEventListener("pointermove", (event) => {
  if (!drag) return;
  [drag.x1, drag.y1] = imageXY(event);
  drag.moved = drag.moved || Math.hypot(event.clientX - drag.css[0], event.clientY - drag.css[1]) >= DRAG_MIN_CSS_PX;
  if (drag.moved) draw();
});

view.addEventListener("pointerup", (event) => {
  if (!drag) return;
  const done = drag;
  drag = null;
  [done.x1, done.y1] = imageXY(event);
  if (done.moved) {
    const box = [Math.min(done.x0, done.x1), Math.min(done.y0, done.y1), Math.max(done.x0, done.x1), Math.max(done.y0, done.y1)];
    changePrompts(() => { prompts.box = box; });
  } else {
    const label = done.background ? 0 : Number(document.querySelector("input[name=label]:checked").value);
    changePrompts(() => { prompts.points.push([done.x0, done.y0]); prompts.labels.push(label); });
  }
});

$("file").addEventListener("change", (event) => {
  if (event.target.files.length) upload(event.target.files[0]);
});

$("undo").addEventListener("click", () => {
  if (!history.length) return;
  prompts = history.pop();
  $("undo").disabled = history.length === 0;
  refine();
});

$("reset").addEventListener("click", () => changePrompts(() => { prompts = { box: null, points: [], labels: [] }; }));

$("show-mask").addEventListener("change", draw);
$("show-uncertainty").addEventListener("change", draw);

fetch("/api/info").then((r) => r.json()).then((info) => {
  const sam = info.models.sam;
  const cnn = info.models.cnn;
  $("models").textContent = `SAM: ${sam.model_id}` + (cnn ? ` | drafts: ${cnn.arch}/${cnn.encoder}` : "") +
    (info.automatic ? "" : " | no CNN run: drag a box after uploading");
}).catch(() => {});
