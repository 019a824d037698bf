// The polybridge page: the router's plan as you type, then images from POST /api/generate. No libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = ["#e8eef9", "#fde2e1", "#e3f4e1", "#fff1cc", "#efe3fb", "#dff4f4", "#fbe6d4", "#e9e9e9",
                 "#f7dcef", "#e2ecd5", "#d9e5ff", "#fce9b8"];
const colours = {};
let info = null;
let planTimer = null;
let planSeq = 0;

function colourOf(code) {
  if (!(code in colours)) colours[code] = PALETTE[Object.keys(colours).length % PALETTE.length];
  return colours[code];
}

function goesTo(span) {
  if (span.target === "backbone") return "backbone text encoder";
  if (span.target === "branch") return span.language + " branch" + (span.trained ? "" : " (untrained)");
  return span.target;
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function showPlan(plan) {
  const box = $("plan");
  box.textContent = "";
  box.className = "";
  if (!plan.spans.length) {
    box.innerHTML = '<span class="muted">no spans: the backbone reads ""</span>';
  }
  for (const span of plan.spans) {
    const el = document.createElement("span");
    el.className = "span";
    el.dataset.language = span.language;
    el.style.background = colourOf(span.language);
    el.title = `${span.language}, confidence ${span.confidence.toFixed(2)} (${span.how})`;
    el.textContent = span.text;
    const small = document.createElement("small");
    small.textContent = `${span.language} → ${goesTo(span)}`;
    el.appendChild(small);
    box.appendChild(el);
  }
  const parts = [];
  if (plan.backbone_text) parts.push(`backbone reads: “${plan.backbone_text}”`);
  for (const [code, text] of Object.entries(plan.branch_texts)) parts.push(`${code} branch reads: “${text}”`);
  $("plan-targets").textContent = parts.join(" · ");
}

function schedulePlan() {
  clearTimeout(planTimer);
  planTimer = setTimeout(async () => {
    const seq = ++planSeq;
    try {
      const plan = await api("/api/route", {prompt: $("prompt").value});
      if (seq === planSeq) showPlan(plan);
    } catch (e) {
      if (seq === planSeq) {
        $("plan").textContent = e.message;
        $("plan").className = "error";
      }
    }
  }, 120);
}

function request() {
  const number = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, english_prompt: $("english").value,
    steps: number("steps"), guidance: number("guidance"), n: number("n"),
    seed: $("random-seed").checked ? null : number("seed"),
    plugins: [...document.querySelectorAll("#plugins input:checked")].map((el) => el.value),
  };
  if ($("language").value) body.language = $("language").value;
  return body;
}

async function generate(event) {
  event.preventDefault();
  const button = $("go");
  button.disabled = true;
  $("status").className = "muted";
  $("status").textContent = "generating…";
  const started = performance.now();
  try {
    const out = await api("/api/generate", request());
    if (out.plan) showPlan(out.plan);
    const results = $("results");
    results.textContent = "";
    out.images.forEach((png, i) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + png;
      img.alt = `${out.language}, seed ${out.seeds[i]}`;
      img.className = "result";
      const caption = document.createElement("figcaption");
      caption.textContent = `${out.language} · seed ${out.seeds[i]} · ${out.steps} steps · guidance ${out.guidance}`;
      figure.append(img, caption);
      results.appendChild(figure);
    });
    if (!$("random-seed").checked) $("seed").value = out.seed;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $("status").textContent = `done in ${seconds}s (shared a call with ${out.batch.requests - 1} other requests)`;
  } catch (e) {
    $("status").className = "error";
    $("status").textContent = e.message;
  } finally {
    button.disabled = false;
  }
}

async function start() {
  info = await api("/api/info");
  for (const lang of info.languages) {
    colourOf(lang.code);
    const option = document.createElement("option");
    option.value = lang.code;
    option.textContent = `${lang.code} · ${lang.native_name}` + (lang.trained ? "" : " (untrained)");
    $("language").appendChild(option);
  }
  $("steps").max = info.limits.steps;
  $("guidance").max = info.limits.guidance;
  $("n").max = info.limits.images;
  $("n").value = Math.min(4, info.limits.images);
  $("steps").value = info.defaults.steps;
  $("guidance").value = info.defaults.guidance;
  const plugins = $("plugins");
  plugins.querySelector("span").remove();
  if (!info.plugins.length) {
    const none = document.createElement("span");
    none.className = "muted";
    none.textContent = "none: the registry names no plugins this server applies";
    plugins.appendChild(none);
  }
  for (const plugin of info.plugins) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = plugin.name;
    label.title = plugin.description || "";
    label.append(box, " " + plugin.name + (plugin.kind === "lora" ? " (LoRA)" : " (" + plugin.token + ")"));
    plugins.appendChild(label);
  }
  $("prompt").addEventListener("input", schedulePlan);
  $("form").addEventListener("submit", generate);
  document.body.dataset.ready = "1";
  if ($("prompt").value) schedulePlan();
}

start().catch((e) => { $("status").className = "error"; $("status").textContent = e.message; });
