// cxr web page: plain JavaScript, no build step, only the public JSON API.
//
// Safety rules of this file (the page's CSP forbids inline script; these keep data inert):
// - Text from the API is only ever put into the page with textContent or as attribute
//   values set through the DOM, never parsed as markup, so a label like <img onerror=...> is text.
// - The API key lives in sessionStorage (this tab only) and travels in the X-API-Key header,
//   never in a URL. Thumbnails are fetched with the header and shown from blob: URLs.
"use strict";

(() => {
  const KEY_SLOT = "cxr.apiKey";
  const THUMB_SIZE = 128;
  const $ = (id) => document.getElementById(id);

  // ---- small DOM helpers -------------------------------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else if (name.startsWith("data-")) node.setAttribute(name, String(value));
      else node[name] = value;
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return node;
  }

  function showError(id, message) {
    const node = $(id);
    node.textContent = message || "";
    node.hidden = !message;
  }

  const fmt = (x, digits = 3) => (typeof x === "number" ? x.toFixed(digits) : "–");
  const pct = (x) => (typeof x === "number" ? `${Math.round(x * 100)}%` : "–");

  // ---- the API -----------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, detail) {
      super(`${status}: ${detail}`);
      this.status = status;
      this.detail = detail;
    }
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_SLOT) || "";
  }

  async function api(method, path, { form, json, blob } = {}) {
    const headers = { "X-API-Key": apiKey() };
    let body;
    if (form) body = form;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body, cache: "no-store", credentials: "omit" });
    } catch (err) {
      throw new ApiError(0, `the service did not answer (${err.message}); is it running?`);
    }
    if (!response.ok) {
      let detail = response.statusText || "error";
      try {
        const data = await response.json();
        if (data && typeof data.detail === "string") detail = data.detail;
        else if (data && data.detail) detail = JSON.stringify(data.detail);
      } catch (_ignored) {
        // not JSON: keep the status text
      }
      if (response.status === 401) onUnauthorized(detail);
      throw new ApiError(response.status, detail);
    }
    if (response.status === 204) return null;
    return blob ? response.blob() : response.json();
  }

  // ---- thumbnails (fetched with the key, shown from blob: URLs) ----------------------------
  const thumbCache = new Map();
  function thumbnail(referenceId, alt) {
    const img = el("img", { alt, className: "thumb", width: THUMB_SIZE, height: THUMB_SIZE });
    const key = `${referenceId}/${THUMB_SIZE}`;
    let pending = thumbCache.get(key);
    if (!pending) {
      pending = api("GET", `/references/${encodeURIComponent(referenceId)}/image?size=${THUMB_SIZE}`, { blob: true })
        .then((b) => URL.createObjectURL(b));
      thumbCache.set(key, pending);
      pending.catch(() => thumbCache.delete(key));
    }
    pending.then((url) => { img.src = url; }, (err) => { img.alt = `${alt} (${err.message})`; img.classList.add("broken"); });
    return img;
  }

  // ---- sign in / out and navigation --------------------------------------------------------
  function onUnauthorized(detail) {
    sessionStorage.removeItem(KEY_SLOT);
    showSignedOut(detail);
  }

  function showSignedOut(message) {
    $("app").hidden = true;
    $("tabs").hidden = true;
    $("logout").hidden = true;
    $("who").textContent = "";
    $("login").hidden = false;
    showError("login-error", message ? `401: ${message}` : "");
  }

  async function signIn(key) {
    sessionStorage.setItem(KEY_SLOT, key);
    try {
      await api("GET", "/classes");
    } catch (err) {
      if (err.status !== 401) showError("login-error", err.message);
      if (err.status !== 401) sessionStorage.removeItem(KEY_SLOT);
      return;
    }
    // Admin-only controls (delete a reference) are shown to admins; a 403 here is expected.
    let admin = false;
    try {
      await api("GET", "/models");
      admin = true;
    } catch (_err) {
      admin = false;
    }
    document.body.dataset.role = admin ? "admin" : "member";
    showError("login-error", "");
    $("login").hidden = true;
    $("app").hidden = false;
    $("tabs").hidden = false;
    $("logout").hidden = false;
    $("who").textContent = `signed in${admin ? " as admin" : ""} (key ${key.slice(0, 10)}…)`;
    go(location.hash.replace("#", "") || "diagnose");
  }

  const PAGES = ["diagnose", "references", "models"];
  function go(page) {
    if (!PAGES.includes(page)) page = "diagnose";
    for (const name of PAGES) {
      $(`page-${name}`).hidden = name !== page;
      $(`tab-${name}`).classList.toggle("active", name === page);
    }
    if (location.hash !== `#${page}`) history.replaceState(null, "", `#${page}`);
    if (page === "references") loadClasses();
    if (page === "models") loadModelsPage();
  }

  // ---- Diagnose ----------------------------------------------------------------------------
  let uploadUrl = null;

  async function diagnose(file) {
    showError("diagnose-error", "");
    $("result").hidden = true;
    $("unknown-banner").hidden = true;
    $("diagnose-status").textContent = `Reading ${file.name}…`;
    const started = performance.now();
    const form = new FormData();
    form.append("file", file, file.name);
    const k = Number($("diagnose-k").value) || 5;
    const method = $("diagnose-method").value;
    let answer;
    try {
      answer = await api("POST", `/predict?explain=true&k=${k}&method=${encodeURIComponent(method)}`, { form });
    } catch (err) {
      $("diagnose-status").textContent = "";
      showError("diagnose-error", err.message);
      return;
    }
    if (uploadUrl) URL.revokeObjectURL(uploadUrl);
    uploadUrl = URL.createObjectURL(file);
    // The browser can show PNG and JPEG itself; a DICOM is only seen through the overlay.
    const shown = /^image\/(png|jpeg)$/.test(file.type) || /\.(png|jpe?g)$/i.test(file.name);
    renderAnswer(answer, shown ? uploadUrl : "");
    const ms = Math.round(performance.now() - started);
    $("diagnose-status").textContent = `Answered in ${ms} ms.`;
    document.body.dataset.lastDiagnoseMs = String(ms);
  }

  function renderAnswer(answer, imageUrl) {
    $("answer-label").textContent = answer.label;
    $("answer-confidence").textContent = pct(answer.confidence);
    $("answer-model").textContent = answer.model_version;
    $("answer-index").textContent = String(answer.index_version);
    $("answer-id").textContent = answer.id;
    $("unknown-score").textContent = fmt(answer.outlier_score);
    $("unknown-threshold").textContent = fmt(answer.outlier_threshold);
    $("unknown-banner").hidden = !answer.unknown;
    $("result").classList.toggle("is-unknown", Boolean(answer.unknown));

    $("upload-img").hidden = !imageUrl;
    if (imageUrl) $("upload-img").src = imageUrl;
    else $("upload-img").removeAttribute("src");
    const overlay = answer.gradcam ? `data:image/png;base64,${answer.gradcam.overlay_png}` : "";
    $("overlay-label").textContent = answer.gradcam ? answer.gradcam.label : "(not computed)";
    $("overlay-img").src = overlay;
    $("overlay-base").hidden = !imageUrl;
    if (imageUrl) $("overlay-base").src = imageUrl;
    $("overlay-img").style.opacity = String(Number($("opacity").value) / 100);

    const bars = $("distances");
    bars.replaceChildren();
    const entries = Object.entries(answer.distances || {}).sort((a, b) => a[1] - b[1]);
    for (const [label, distance] of entries) {
      const bar = el("span", { className: "bar" });
      bar.style.width = `${Math.max(1, Math.min(100, (distance / 2) * 100))}%`;
      const row = el("div", { className: `bar-row${label === answer.label ? " chosen" : ""}` },
        el("span", { className: "bar-label", text: label }),
        el("span", { className: "bar-track" }, bar),
        el("span", { className: "bar-value", text: fmt(distance) }));
      row.setAttribute("data-label", label);
      bars.append(row);
    }

    const list = $("neighbors");
    list.replaceChildren();
    for (const n of answer.neighbors || []) {
      list.append(el("li", { className: "neighbor" },
        thumbnail(n.reference_id, `Reference ${n.label}`),
        el("span", { className: "thumb-label", text: n.label }),
        el("span", { className: "thumb-distance", text: `distance ${fmt(n.distance)}` })));
    }
    $("result").hidden = false;
  }

  function setupDiagnose() {
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (file) diagnose(file);
    });
    $("diagnose-file").addEventListener("change", (e) => {
      const file = e.target.files[0];
      if (file) diagnose(file);
    });
    $("opacity").addEventListener("input", (e) => {
      $("overlay-img").style.opacity = String(Number(e.target.value) / 100);
    });
  }

  // ---- References --------------------------------------------------------------------------
  let browsing = { label: null, offset: 0 };

  async function loadClasses() {
    showError("classes-error", "");
    let classes;
    try {
      classes = await api("GET", "/classes");
    } catch (err) {
      showError("classes-error", err.message);
      return;
    }
    $("class-options").replaceChildren(...classes.map((c) => el("option", { value: c.label })));
    $("classes").replaceChildren(...classes.map((c) => {
      const button = el("button", { type: "button", className: "chip" }, c.label, el("small", { text: ` ${c.count}` }));
      button.setAttribute("data-label", c.label);
      button.addEventListener("click", () => browse(c.label, 0));
      return el("li", {}, button);
    }));
  }

  async function browse(label, offset) {
    browsing = { label, offset };
    $("browse-title").hidden = false;
    $("browse-label").textContent = label;
    const limit = 24;
    let page;
    try {
      page = await api("GET", `/references?label=${encodeURIComponent(label)}&limit=${limit}&offset=${offset}`);
    } catch (err) {
      showError("classes-error", err.message);
      return;
    }
    const grid = $("browse");
    if (offset === 0) grid.replaceChildren();
    for (const ref of page.data) {
      const remove = el("button", { type: "button", className: "danger admin-only", text: "Delete" });
      const item = el("li", { className: "reference" },
        thumbnail(ref.id, `Reference ${ref.label}`),
        el("span", { className: "thumb-label", text: `${ref.width}×${ref.height} ${ref.source_format}` }),
        remove);
      item.setAttribute("data-reference-id", ref.id);
      remove.addEventListener("click", async () => {
        if (!window.confirm("Delete this reference? Predictions stop using it at once.")) return;
        try {
          await api("DELETE", `/references/${encodeURIComponent(ref.id)}`);
          item.remove();
          loadClasses();
        } catch (err) {
          showError("classes-error", err.message);
        }
      });
      grid.append(item);
    }
    $("browse-more").hidden = offset + page.data.length >= page.count;
  }

  async function enroll(event) {
    event.preventDefault();
    showError("enroll-error", "");
    const label = $("enroll-label").value.trim();
    const files = Array.from($("enroll-files").files);
    if (!label || files.length === 0) {
      showError("enroll-error", "Give a class and choose one or more images.");
      return;
    }
    const table = $("enroll-results");
    const body = table.tBodies[0];
    body.replaceChildren();
    table.hidden = false;
    // One request per file, so one refused file does not refuse the others and every file
    // gets its own answer.
    for (const file of files) {
      const status = el("td", { text: "sending…" });
      const ref = el("td");
      const row = el("tr", {}, el("td", { text: file.name }), status, ref);
      body.append(row);
      const form = new FormData();
      form.append("label", label);
      form.append("file", file, file.name);
      try {
        const result = await api("POST", "/references", { form });
        const item = result.references[0];
        status.textContent = item.duplicate ? `duplicate: already enrolled as ${item.label}` : "enrolled";
        row.className = item.duplicate ? "duplicate" : "ok";
        ref.textContent = item.id;
      } catch (err) {
        status.textContent = `refused: ${err.message}`;
        row.className = "refused";
      }
    }
    loadClasses();
  }

  // ---- Models and jobs ---------------------------------------------------------------------
  // k-NN balanced accuracy and where it was measured: a checkpoint trained by `cxr train`
  // carries its test and validation summaries, a retrained version its job's validation score.
  function balancedAccuracy(metrics) {
    if (!metrics) return "–";
    const num = (x) => (typeof x === "number" ? x : undefined);
    const candidates = [
      [num(metrics.test && metrics.test.balanced_accuracy), "test"],
      [num(metrics.knn_balanced_accuracy), "validation"],
      [num(metrics.validation && metrics.validation.new), "validation"],
      [num(metrics.val && metrics.val.balanced_accuracy), "validation"],
      [num(metrics.knn && metrics.knn.balanced_accuracy), ""],
    ];
    const found = candidates.find(([value]) => value !== undefined);
    return found ? `${fmt(found[0])} ${found[1]}`.trim() : "–";
  }

  async function loadModelsPage() {
    await Promise.all([loadModels(), loadAudit()]);
  }

  async function loadModels() {
    showError("models-error", "");
    let models;
    try {
      models = await api("GET", "/models");
    } catch (err) {
      showError("models-error", err.message);
      return;
    }
    const body = $("models").tBodies[0];
    body.replaceChildren(...models.map((m) => {
      const action = el("td");
      if (!m.active) {
        const button = el("button", { type: "button", className: "activate", text: "Activate" });
        button.addEventListener("click", () => activate(m.version));
        action.append(button);
      }
      const row = el("tr", { className: m.active ? "active" : "" },
        el("td", {}, el("code", { text: m.version })),
        el("td", { text: new Date(m.created_at).toLocaleString() }),
        el("td", { text: `${m.encoder_name} (${m.embedding_dim})` }),
        el("td", { text: balancedAccuracy(m.metrics) }),
        el("td", { text: m.active ? "active" : "candidate" }),
        action);
      row.setAttribute("data-version", m.version);
      return row;
    }));
  }

  async function activate(version) {
    showError("models-error", "");
    try {
      await api("POST", `/admin/models/${encodeURIComponent(version)}/activate`);
    } catch (err) {
      showError("models-error", err.message);
      return;
    }
    await loadModels();
  }

  async function loadAudit() {
    showError("audit-error", "");
    let rows;
    try {
      rows = await api("GET", "/predictions?limit=20");
    } catch (err) {
      showError("audit-error", err.message);
      return;
    }
    $("audit").tBodies[0].replaceChildren(...rows.map((p) => el("tr", { className: p.unknown ? "unknown" : "" },
      el("td", { text: new Date(p.created_at).toLocaleString() }),
      el("td", { text: p.label }),
      el("td", { text: pct(p.confidence) }),
      el("td", { text: p.unknown ? "unknown" : "" }),
      el("td", {}, el("code", { text: p.model_version })),
      el("td", {}, el("code", { text: p.id })))));
  }

  async function retrain(event) {
    event.preventDefault();
    showError("retrain-error", "");
    const params = {};
    for (const [field, id, numeric] of [["epochs", "retrain-epochs", true], ["image_size", "retrain-image-size", true],
      ["encoder", "retrain-encoder", false], ["loss", "retrain-loss", false]]) {
      const value = $(id).value.trim();
      if (value) params[field] = numeric ? Number(value) : value;
    }
    let job;
    try {
      job = await api("POST", "/admin/retrain", { json: params });
    } catch (err) {
      showError("retrain-error", err.message);
      return;
    }
    watchJob(job.job_id);
  }

  async function watchJob(jobId) {
    $("job").hidden = false;
    $("job").setAttribute("data-job-id", jobId);
    for (;;) {
      let job;
      try {
        job = await api("GET", `/jobs/${encodeURIComponent(jobId)}`);
      } catch (err) {
        showError("retrain-error", err.message);
        return;
      }
      $("job-progress").value = job.progress || 0;
      $("job-status").textContent = `${job.status} ${pct(job.progress || 0)}`;
      $("job").setAttribute("data-status", job.status);
      if (job.status === "succeeded" || job.status === "failed") {
        $("job-detail").textContent = job.status === "failed"
          ? `failed: ${job.error || "no reason given"}`
          : `new model ${job.model_version || "(none)"}; balanced accuracy ${balancedAccuracy(job.metrics)}`
            + (job.metrics && job.metrics.decision ? `; ${job.metrics.decision}` : "");
        await loadModels();
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }

  // ---- start -------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("api-key").value.trim();
      $("api-key").value = "";
      if (key) signIn(key);
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_SLOT);
      delete document.body.dataset.role;
      for (const pending of thumbCache.values()) pending.then((url) => URL.revokeObjectURL(url), () => {});
      thumbCache.clear();
      showSignedOut("");
    });
    for (const name of PAGES) $(`tab-${name}`).addEventListener("click", () => go(name));
    setupDiagnose();
    $("enroll-form").addEventListener("submit", enroll);
    $("retrain-form").addEventListener("submit", retrain);
    $("browse-more").addEventListener("click", () => browse(browsing.label, browsing.offset + 24));
    if (apiKey()) signIn(apiKey());
    else showSignedOut("");
  });
})();
