"""The web UI at ``/``: one static page that calls the same HTTP API as every other client (no second code path)."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Kandinsky 3</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 0; display: grid; grid-template-columns: 360px 1fr; min-height: 100vh; }
  aside { background: #f4f4f6; padding: 12px 16px; border-right: 1px solid #ddd; overflow-y: auto; }
  main { padding: 12px 16px; }
  label { display: block; margin: 6px 0 2px; color: #444; }
  input[type=text], input[type=number], input[type=password], textarea, select { width: 100%; box-sizing: border-box; }
  textarea { height: 4em; }
  .row { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
  .row4 { display: grid; grid-template-columns: repeat(4, 1fr); gap: 6px; }
  button { margin: 8px 4px 0 0; padding: 6px 14px; }
  #progress { width: 100%; height: 14px; margin-top: 8px; }
  #status { color: #555; min-height: 1.4em; }
  #error { color: #b00; white-space: pre-wrap; }
  .hidden { display: none; }
  #editor { position: relative; display: inline-block; margin-top: 6px; border: 1px solid #bbb; }
  #editor canvas { display: block; width: 256px; image-rendering: pixelated; }
  #mask { position: absolute; left: 0; top: 0; opacity: 0.55; cursor: crosshair; touch-action: none; }
  #gallery { display: flex; flex-wrap: wrap; gap: 12px; }
  .card { border: 1px solid #ddd; padding: 6px; width: 280px; background: #fff; }
  .card img { width: 100%; image-rendering: pixelated; }
  .card pre { font-size: 11px; white-space: pre-wrap; max-height: 9em; overflow: auto; background: #fafafa; }
</style>
</head>
<body>
<aside>
  <h2 style="margin:4px 0">Kandinsky 3</h2>
  <label for="apikey">API key (if the server needs one)</label>
  <input id="apikey" type="password" autocomplete="off">
  <label for="task">Task</label>
  <select id="task">
    <option value="generate">text → image</option>
    <option value="edit">image → image</option>
    <option value="inpaint">inpaint (brush the area to repaint)</option>
    <option value="outpaint">outpaint</option>
    <option value="upscale">upscale</option>
  </select>
  <label for="model">Model</label>
  <select id="model"></select>
  <div data-for="generate edit inpaint outpaint">
    <label for="prompt">Prompt</label>
    <textarea id="prompt">a red circle in the top left on a gray background</textarea>
    <label for="negative">Negative prompt</label>
    <input id="negative" type="text">
    <label><input id="beautify" type="checkbox"> beautify the prompt first (template)</label>
  </div>
  <div class="row">
    <div><label for="steps">Steps</label><input id="steps" type="number" min="1" placeholder="model default"></div>
    <div><label for="seed">Seed</label><input id="seed" type="number" min="0" placeholder="random"></div>
  </div>
  <div data-for="generate edit inpaint outpaint">
    <div class="row">
      <div><label for="guidance">Guidance</label><input id="guidance" type="number" step="0.1" min="0" placeholder="default"></div>
      <div><label for="sampler">Sampler</label><select id="sampler"><option value="">default</option></select></div>
    </div>
    <div class="row" data-for="generate edit inpaint">
      <div><label for="width">Width</label><input id="width" type="number" step="32" min="32" placeholder="default"></div>
      <div><label for="height">Height</label><input id="height" type="number" step="32" min="32" placeholder="default"></div>
    </div>
    <label for="num_images">Images</label><input id="num_images" type="number" min="1" value="1">
  </div>
  <div data-for="edit"><label for="strength">Strength</label><input id="strength" type="number" step="0.05" min="0.05" max="1" value="0.3"></div>
  <div data-for="outpaint" class="row4">
    <div><label for="left">Left</label><input id="left" type="number" min="0" value="32"></div>
    <div><label for="right">Right</label><input id="right" type="number" min="0" value="32"></div>
    <div><label for="top">Top</label><input id="top" type="number" min="0" value="0"></div>
    <div><label for="bottom">Bottom</label><input id="bottom" type="number" min="0" value="0"></div>
  </div>
  <div data-for="inpaint outpaint"><label><input id="paste_back" type="checkbox" checked> paste back the original outside the mask</label></div>
  <div data-for="upscale"><label for="scale">Scale</label><select id="scale"><option>4</option><option>2</option></select></div>
  <div data-for="edit inpaint outpaint upscale">
    <label for="file">Input image</label>
    <input id="file" type="file" accept="image/png,image/jpeg,image/webp">
    <div id="editor" class="hidden">
      <canvas id="picture"></canvas>
      <canvas id="mask"></canvas>
    </div>
    <div data-for="inpaint" class="row">
      <div><label for="brush">Brush</label><input id="brush" type="range" min="1" max="32" value="8"></div>
      <div><button id="clearmask" type="button">clear mask</button></div>
    </div>
  </div>
  <button id="go" type="button">Generate</button><button id="cancel" type="button" disabled>Cancel</button>
  <progress id="progress" max="1" value="0"></progress>
  <div id="status"></div>
  <div id="error"></div>
</aside>
<main>
  <div id="gallery"></div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let inputDataUrl = null, currentJob = null, models = {};
$("apikey").value = localStorage.getItem("k3-apikey") || "";
$("apikey").onchange = () => localStorage.setItem("k3-apikey", $("apikey").value);

function headers(json) {
  const h = json ? {"Content-Type": "application/json"} : {};
  if ($("apikey").value) h["Authorization"] = "Bearer " + $("apikey").value;
  return h;
}
async function api(method, path, body) {
  const r = await fetch(path, {method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body)});
  const ct = r.headers.get("content-type") || "";
  const data = ct.includes("json") ? await r.json() : await r.blob();
  if (!r.ok) {
    const d = data && data.detail;
    const msg = Array.isArray(d) ? d.map((e) => e.msg).join("\n") : (d || r.statusText);
    throw new Error(r.status + ": " + msg);
  }
  return data;
}

function showFields() {
  const task = $("task").value;
  document.querySelectorAll("[data-for]").forEach((el) => el.classList.toggle("hidden", !el.dataset.for.split(" ").includes(task)));
  $("editor").classList.toggle("hidden", !inputDataUrl || task === "generate");
  $("mask").classList.toggle("hidden", task !== "inpaint");
  const sel = $("model"), keep = sel.value;
  sel.innerHTML = "";
  for (const [name, info] of Object.entries(models)) if (info.tasks.includes(task)) sel.add(new Option(name, name));
  if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
}
$("task").onchange = showFields;

async function init() {
  try {
    const spec = await (await fetch("/openapi.json")).json();
    const s = spec.components.schemas.GenerateJob.properties.sampler;
    const options = (s.anyOf || [s]).flatMap((x) => x.enum || []);
    for (const o of options) $("sampler").add(new Option(o, o));
  } catch (e) { /* the sampler list is a convenience */ }
  for (let i = 0; i < 120; i++) {
    try { models = (await api("GET", "/v1/models")).models; break; }
    catch (e) { $("status").textContent = "waiting for the server: " + e.message; await new Promise((r) => setTimeout(r, 1000)); }
  }
  $("status").textContent = "ready";
  showFields();
}

// -- input image and the mask brush -------------------------------------------------------------------------------
$("file").onchange = () => {
  const f = $("file").files[0];
  if (!f) return;
  const reader = new FileReader();
  reader.onload = () => {
    inputDataUrl = reader.result;
    const img = new Image();
    img.onload = () => {
      for (const c of [$("picture"), $("mask")]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
      $("picture").getContext("2d").drawImage(img, 0, 0);
      $("mask").style.width = $("picture").getBoundingClientRect().width + "px";
      clearMask();
      showFields();
    };
    img.src = inputDataUrl;
  };
  reader.readAsDataURL(f);
};
function clearMask() { $("mask").getContext("2d").clearRect(0, 0, $("mask").width, $("mask").height); }
$("clearmask").onclick = clearMask;
let drawing = false, last = null;
function pos(ev) {
  const r = $("mask").getBoundingClientRect();
  return [(ev.clientX - r.left) * $("mask").width / r.width, (ev.clientY - r.top) * $("mask").height / r.height];
}
function stroke(ev) {
  const p = pos(ev), ctx = $("mask").getContext("2d");
  const scale = $("mask").width / $("mask").getBoundingClientRect().width;
  ctx.strokeStyle = "#fff"; ctx.fillStyle = "#fff"; ctx.lineCap = "round"; ctx.lineJoin = "round";
  ctx.lineWidth = $("brush").value * scale;
  ctx.beginPath(); ctx.moveTo(...(last || p)); ctx.lineTo(...p); ctx.stroke();
  last = p;
}
$("mask").addEventListener("pointerdown", (ev) => { drawing = true; last = null; stroke(ev); });
$("mask").addEventListener("pointermove", (ev) => { if (drawing) stroke(ev); });
window.addEventListener("pointerup", () => { drawing = false; last = null; });
function maskDataUrl() {
  const c = document.createElement("canvas");
  c.width = $("mask").width; c.height = $("mask").height;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, c.width, c.height);
  ctx.drawImage($("mask"), 0, 0);
  return c.toDataURL("image/png");
}

// -- requests --------------------------------------------------------------------------------------------------------
function num(id) { const v = $(id).value; return v === "" ? undefined : Number(v); }
function buildRequest() {
  const task = $("task").value, body = {task};
  if ($("model").value && task !== "upscale") body.model = $("model").value;
  body.steps = num("steps"); body.seed = num("seed");
  if (task !== "upscale") {
    body.prompt = $("prompt").value;
    if ($("negative").value) body.negative_prompt = $("negative").value;
    if ($("beautify").checked && task === "generate") body.beautify = "template";
    body.guidance = num("guidance"); body.num_images = num("num_images");
    if ($("sampler").value) body.sampler = $("sampler").value;
    if (task !== "outpaint") { body.width = num("width"); body.height = num("height"); }
  }
  if (task === "edit") body.strength = num("strength");
  if (task === "outpaint") for (const k of ["left", "right", "top", "bottom"]) body[k] = num(k) || 0;
  if (task === "inpaint" || task === "outpaint") body.paste_back = $("paste_back").checked;
  if (task === "upscale") body.scale = Number($("scale").value);
  if (task !== "generate") {
    if (!inputDataUrl) throw new Error("choose an input image first");
    body.image = inputDataUrl;
  }
  if (task === "inpaint") body.mask = maskDataUrl();
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

async function run() {
  $("error").textContent = "";
  let body;
  try { body = buildRequest(); } catch (e) { $("error").textContent = e.message; return; }
  $("go").disabled = true; $("cancel").disabled = false; $("progress").value = 0;
  try {
    const job = await api("POST", "/v1/jobs", body);
    currentJob = job.id;
    let view;
    for (;;) {
      view = await api("GET", "/v1/jobs/" + job.id);
      $("progress").value = view.progress.fraction;
      $("status").textContent = view.state + (view.state === "queued" ? " (" + view.queue_position + " ahead)" :
        view.progress.total ? " step " + view.progress.step + "/" + view.progress.total : "");
      if (["done", "failed", "cancelled"].includes(view.state)) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    if (view.state === "failed") throw new Error(view.error);
    if (view.state === "done") for (let k = 0; k < view.images.length; k++) await addCard(view, k);
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    $("go").disabled = false; $("cancel").disabled = true; currentJob = null;
  }
}
$("go").onclick = run;
$("cancel").onclick = async () => { if (currentJob) await api("DELETE", "/v1/jobs/" + currentJob).catch(() => {}); };

async function addCard(view, k) {
  const blob = await api("GET", new URL(view.images[k]).pathname);
  const card = document.createElement("div");
  card.className = "card"; card.dataset.job = view.id; card.dataset.index = k;
  const img = document.createElement("img");
  img.src = URL.createObjectURL(blob); img.alt = view.request.prompt || view.task;
  const seed = Array.isArray(view.settings.seed) ? view.settings.seed[k] : view.settings.seed;
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify({prompt: view.request.prompt, ...view.settings, seed}, null, 1);
  const again = document.createElement("button");
  again.textContent = "re-run with this seed"; again.className = "rerun";
  again.onclick = () => rerun(view, seed);
  const use = document.createElement("button");
  use.textContent = "use as input";
  use.onclick = () => useAsInput(blob);
  card.append(img, pre, again, use);
  $("gallery").prepend(card);
}
function rerun(view, seed) {
  const r = view.request;
  $("task").value = view.task;
  const set = (id, v) => { if ($(id)) $(id).value = v === null || v === undefined ? "" : v; };
  for (const k of ["prompt", "steps", "guidance", "width", "height", "strength", "left", "right", "top", "bottom"]) if (k in r) set(k, r[k]);
  set("negative", r.negative_prompt); set("sampler", r.sampler || ""); set("num_images", 1); set("seed", seed);
  showFields();
}
function useAsInput(blob) {
  const dt = new DataTransfer();
  dt.items.add(new File([blob], "input.png", {type: "image/png"}));
  $("file").files = dt.files;
  $("file").onchange();
}
init();
</script>
</body>
</html>
"""  # noqa: E501 - one static page, kept readable as written
