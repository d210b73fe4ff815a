// astrovl search page: plain JavaScript, no build step, no external assets.
// Every text from the index (metadata, headers, file names) is put into the page with
// textContent, never as HTML, and through shown(), which neutralises bidirectional controls.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("search-form"), q: $("q"), k: $("k"), upload: $("upload"), filters: $("filters"),
    status: $("status"), results: $("results"), empty: $("empty"), name: $("index-name"),
    info: $("index-info"), detail: $("detail"), backdrop: $("backdrop"), title: $("detail-title"),
    image: $("detail-image"), more: $("more-like"), close: $("detail-close"), sky: $("detail-sky"),
    meta: $("detail-meta"), header: $("detail-header"), headerSection: $("detail-header-section"),
    score: $("detail-score"), dropzone: $("dropzone"), button: $("search-button"),
    assistant: $("assistant"), askForm: $("ask-form"), describe: $("describe"), question: $("question"),
    answer: $("answer"), answerStatus: $("answer-status"), rerank: $("rerank"), rerankLabel: $("rerank-label"),
  };
  const state = { info: null, detailId: null, detailUpload: null, lastCard: null, request: 0, answer: null,
    lastUpload: null };

  // Bidirectional control characters (embeddings, overrides, isolates, marks) in a label or a
  // header would reorder the text shown around them: each is shown as <U+XXXX> instead.
  const BIDI_CONTROLS = /[\u202A-\u202E\u2066-\u2069\u200E\u200F\u061C]/g;
  function shown(value) {
    return String(value).replace(BIDI_CONTROLS,
      (c) => `<U+${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0")}>`);
  }

  function setText(node, value) { node.textContent = shown(value); }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key === "text" || key === "title" || key === "alt") node[key === "text" ? "textContent" : key] = shown(value);
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  function apiUrl(path, params) {
    const url = new URL(path, document.baseURI);
    for (const [key, value] of params || []) url.searchParams.append(key, value);
    return url;
  }

  async function call(url, options) {
    const response = await fetch(url, Object.assign({ credentials: "same-origin" }, options || {}));
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok) {
      const message = body && body.error ? body.error : `the server answered ${response.status}`;
      throw new Error(message);
    }
    return body;
  }

  function setStatus(parts, isError) {
    els.status.replaceChildren(...parts.map((p) => (typeof p === "string" ? document.createTextNode(shown(p)) : p)));
    els.status.classList.toggle("error", Boolean(isError));
  }

  function fmtScore(score) { return Number(score).toFixed(3); }

  function fmtPosition(ra, dec) {
    if (ra == null || dec == null) return "";
    return `RA ${Number(ra).toFixed(4)}°  Dec ${Number(dec) >= 0 ? "+" : ""}${Number(dec).toFixed(4)}°`;
  }

  // ------------------------------------------------------------------ index information
  async function loadInfo() {
    try {
      const info = await call(apiUrl("api/info"));
      state.info = info;
      setText(els.name, `· ${info.name}`);
      document.title = shown(`astrovl · ${info.name}`);
      const model = (info.model && (info.model.name || info.model.id) ? ` · model ${info.model.name || info.model.id}` : "")
        + (info.model && info.model.random ? " (random weights: results carry no meaning)" : "");
      const rerank = info.rerank ? ` · text searches re-ranked by ${info.rerank.model}` : "";
      setText(els.info, `${info.count.toLocaleString()} images · ${info.dim}-d ${info.kind} index${model}${rerank}`);
      if (info.rerank) {
        els.rerankLabel.hidden = false;
        els.rerankLabel.title = shown(`re-order CLIP's best ${info.rerank.top} results with ${info.rerank.model}`);
      }
      buildFilters(info.filters || {});
    } catch (err) {
      setText(els.info, `could not read the index information: ${err.message}`);
    }
  }

  function buildFilters(filters) {
    els.filters.replaceChildren();
    const names = Object.keys(filters);
    if (!names.length) return;
    for (const name of names) {
      const select = el("select", { name: "filter", id: `filter-${name}` });
      select.dataset.column = name;
      select.append(el("option", { value: "", text: "any" }));
      for (const value of filters[name]) select.append(el("option", { value, text: value }));
      select.addEventListener("change", () => rerun());
      els.filters.append(el("label", { htmlFor: select.id }, el("span", { text: name }), select));
    }
    const clear = el("button", { type: "button", class: "clear", text: "Clear filters" });
    clear.addEventListener("click", () => {
      for (const s of els.filters.querySelectorAll("select")) s.value = "";
      rerun();
    });
    els.filters.append(clear);
  }

  function chosenFilters() {
    const out = [];
    for (const s of els.filters.querySelectorAll("select")) {
      if (s.value !== "") out.push(`${s.dataset.column}:${s.value}`);
    }
    return out;
  }

  // ------------------------------------------------------------------ searching
  let lastQuery = null;

  function rerun() {
    if (lastQuery) lastQuery();
  }

  function remember(params) {
    const url = new URL(window.location.href);
    url.search = "";
    for (const [key, value] of params) url.searchParams.append(key, value);
    window.history.replaceState(null, "", url);
  }

  async function run(describe, request) {
    const ticket = ++state.request;
    document.body.classList.add("busy");
    els.button.disabled = true;
    setStatus(["Searching…"]);
    try {
      const answer = await request();
      if (ticket !== state.request) return;
      render(answer, describe);
    } catch (err) {
      if (ticket !== state.request) return;
      setStatus([err.message], true);
    } finally {
      if (ticket === state.request) {
        document.body.classList.remove("busy");
        els.button.disabled = false;
      }
    }
  }

  function searchText(text) {
    const q = text.trim();
    if (!q) {
      setStatus(["Type what you are looking for first."], true);
      els.q.focus();
      return;
    }
    const params = [["q", q], ["k", els.k.value], ...chosenFilters().map((f) => ["filter", f])];
    if (state.info && state.info.rerank) params.push(["rerank", els.rerank.checked ? "1" : "0"]);
    lastQuery = () => searchText(q);
    remember(params);
    run(["for ", el("strong", { text: `“${q}”` })], () => call(apiUrl("api/search", params)));
  }

  function searchLike(id, label) {
    const params = [["k", els.k.value], ...chosenFilters().map((f) => ["filter", f])];
    lastQuery = () => searchLike(id, label);
    remember([["like", String(id)], ...params]);
    closeDetail(false);
    run(["like ", el("strong", { text: label || `item ${id}` })], () => call(apiUrl("api/search", params), {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id }),
    }));
  }

  function searchFile(file) {
    if (!file) return;
    const limit = state.info ? state.info.max_upload_bytes : null;
    if (limit && file.size > limit) {
      setStatus([`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ${(limit / 2 ** 20).toFixed(0)} MB.`], true);
      return;
    }
    const params = [["k", els.k.value], ...chosenFilters().map((f) => ["filter", f])];
    lastQuery = () => searchFile(file);
    remember([]);
    const form = new FormData();
    form.append("file", file, file.name);
    state.lastUpload = file;
    run(["like the uploaded ", el("strong", { text: file.name })],
      () => call(apiUrl("api/search", params), { method: "POST", body: form }));
  }

  function uploadButton() {
    if (!state.lastUpload || !assistantOn()) return null;
    const file = state.lastUpload;
    const button = el("button", { type: "button", id: "open-upload", text: "Describe or ask about it" });
    button.addEventListener("click", () => openUpload(file));
    return button;
  }

  function render(answer, describe) {
    const results = answer.results || [];
    els.results.replaceChildren(...results.map(card));
    els.empty.hidden = results.length > 0;
    const filters = Object.entries(answer.filters || {}).map(([c, v]) => `${c} = ${v.join(" or ")}`);
    const parts = [
      `${results.length} result${results.length === 1 ? "" : "s"} `, ...describe,
      filters.length ? ` where ${filters.join(", ")}` : "",
      ` · ${answer.took_ms} ms`,
    ];
    if (answer.query && answer.query.kind === "image") parts.push(uploadButton());
    setStatus(parts.filter((p) => p != null));
  }

  // both scores of a re-ranked result (CLIP's and the re-ranking model's), else CLIP's
  function scoreText(result) {
    if (!("rerank_score" in result)) return `score ${fmtScore(result.score)}`;
    const model = result.rerank_score == null ? "image not read" : fmtScore(result.rerank_score);
    return `CLIP score ${fmtScore(result.score)} (#${result.clip_rank}) · AstroLLaVA score ${model}`;
  }

  function card(result) {
    const button = el("button", { type: "button", class: "card", title: `${result.label} — ${scoreText(result)}` });
    button.dataset.id = String(result.id);
    button.dataset.score = String(result.score);
    const thumb = el("div", { class: "thumb" });
    if (result.thumbnail) {
      const img = el("img", { src: result.thumbnail, alt: result.label, loading: "lazy", decoding: "async" });
      img.addEventListener("error", () => img.replaceWith(el("span", { class: "noimg", text: "no preview" })));
      thumb.append(img);
    } else {
      thumb.append(el("span", { class: "noimg", text: "no image file" }));
    }
    thumb.append(el("span", { class: "score", title: "CLIP score", text: fmtScore(result.score) }));
    if ("rerank_score" in result) {
      button.dataset.rerankScore = String(result.rerank_score);
      thumb.append(el("span", { class: "rerank-score", title: "AstroLLaVA score",
        text: result.rerank_score == null ? "–" : fmtScore(result.rerank_score) }));
    }
    thumb.append(el("span", { class: "rank", text: `#${result.rank}` }));
    const sub = fmtPosition(result.ra, result.dec) || subtitle(result);
    button.append(thumb, el("span", { class: "caption" }, el("span", { class: "label", text: result.label }),
      el("span", { class: "sub", text: sub })));
    button.addEventListener("click", () => openDetail(result.id, scoreText(result), button));
    return el("li", {}, button);
  }

  function subtitle(result) {
    const label = state.info ? state.info.label_column : null;
    for (const [key, value] of Object.entries(result.metadata || {})) {
      if (key !== label && value !== null && value !== "" && typeof value !== "object") return `${key}: ${value}`;
    }
    return `item ${result.id}`;
  }

  // ------------------------------------------------------------------ detail view
  async function openDetail(id, scoreLine, fromCard) {
    state.lastCard = fromCard || null;
    state.detailId = id;
    state.detailUpload = null;
    resetAnswer();
    els.more.hidden = false;
    setText(els.title, `item ${id}`);
    setText(els.score, scoreLine || "");
    setText(els.sky, "…");
    els.meta.replaceChildren();
    els.header.replaceChildren();
    els.image.removeAttribute("src");
    els.detail.hidden = false;
    els.backdrop.hidden = false;
    els.close.focus();
    try {
      const item = await call(apiUrl(`api/item/${encodeURIComponent(id)}`));
      if (state.detailId !== id) return;
      fillDetail(item);
    } catch (err) {
      setText(els.sky, err.message);
    }
  }

  function fillDetail(item) {
    setText(els.title, item.label);
    if (item.thumbnail) {
      els.image.src = item.thumbnail;  // the cached thumbnail at once, the larger preview when ready
      els.image.alt = shown(item.label);
      const preview = new Image();
      preview.addEventListener("load", () => { if (state.detailId === item.id) els.image.src = preview.src; });
      preview.src = `${item.thumbnail}?size=large`;
      els.image.parentElement.hidden = false;
    } else {
      els.image.parentElement.hidden = true;
    }
    if (item.ra != null && !item.sky) {  // e.g. a catalogue's dec = 99: shown as recorded, not converted
      setText(els.sky, `${fmtPosition(item.ra, item.dec)} (as recorded; not a valid sky position)`);
    } else if (item.ra != null) {
      const sky = item.sky;
      els.sky.replaceChildren(
        document.createTextNode(fmtPosition(item.ra, item.dec)), el("br"),
        document.createTextNode(`${sky.ra_hms || ""}  ${sky.dec_dms || ""}  (ICRS, image centre)`), el("br"),
        document.createTextNode(sky.l != null ? `Galactic l ${sky.l.toFixed(4)}°  b ${sky.b.toFixed(4)}°` : ""));
    } else {
      setText(els.sky, item.has_image ? "no celestial WCS in this image" : (item.image_error || "no image file"));
    }
    const rows = Object.entries(item.metadata || {}).map(([key, value]) =>
      el("tr", {}, el("th", { text: key }), el("td", { text: value === null ? "—" : String(value) })));
    if (item.image && item.image.shape) {
      rows.push(el("tr", {}, el("th", { text: "pixels" }),
        el("td", { text: `${item.image.shape[1]} × ${item.image.shape[0]} (${item.image.format || "image"})` })));
    }
    els.meta.replaceChildren(...rows);
    const hdus = item.hdus || [];
    els.headerSection.hidden = hdus.length === 0;
    els.header.replaceChildren(...hdus.map((hdu, i) => {
      const table = el("table", { class: "cards" });
      for (const [key, value, comment] of hdu.cards) {
        table.append(el("tr", {}, el("td", { text: key }), el("td", { text: cardValue(value) }),
          el("td", { text: comment })));
      }
      const details = el("details", { class: "hdu" },
        el("summary", { text: `HDU ${hdu.index} ${hdu.name} · ${hdu.cards.length} cards` }), table);
      details.open = i === hdus.length - 1;
      return details;
    }));
  }

  function cardValue(value) {
    if (value === true) return "T";
    if (value === false) return "F";
    return value === null ? "" : String(value);
  }

  // the detail view of an uploaded image: only the assistant (and "more like this") apply
  function openUpload(file) {
    state.lastCard = document.activeElement;
    state.detailId = null;
    state.detailUpload = file;
    resetAnswer();
    setText(els.title, file.name);
    setText(els.score, "uploaded image");
    const picture = /^image\/(png|jpeg|gif|webp|bmp)$/.test(file.type);
    if (picture) {
      if (els.image.src.startsWith("blob:")) URL.revokeObjectURL(els.image.src);
      els.image.src = URL.createObjectURL(file);
      els.image.alt = file.name;
    }
    els.image.parentElement.hidden = !picture;
    setText(els.sky, "an uploaded image: its position is not known to the index");
    els.meta.replaceChildren(
      el("tr", {}, el("th", { text: "file" }), el("td", { text: file.name })),
      el("tr", {}, el("th", { text: "size" }), el("td", { text: `${(file.size / 1024).toFixed(1)} KB` })));
    els.headerSection.hidden = true;
    els.detail.hidden = false;
    els.backdrop.hidden = false;
    els.describe.focus();
  }

  // ------------------------------------------------------------------ assistant
  function assistantOn() { return Boolean(state.info && state.info.assistant); }

  function resetAnswer() {
    if (state.answer) state.answer.abort();
    state.answer = null;
    els.assistant.hidden = !assistantOn();
    els.answer.replaceChildren();
    els.answer.classList.remove("error", "streaming");
    els.answer.dataset.pieces = "0";
    setText(els.answerStatus, "");
  }

  // Ask the server to describe the open image (no question) or to answer a question about it;
  // the answer arrives as server-sent events and is added to the page as text, piece by piece.
  async function askAssistant(question) {
    resetAnswer();
    const abort = new AbortController();
    state.answer = abort;
    const path = question ? "api/ask" : "api/caption";
    const options = { method: "POST", credentials: "same-origin", signal: abort.signal };
    if (state.detailUpload) {
      const form = new FormData();
      form.append("file", state.detailUpload, state.detailUpload.name);
      if (question) form.append("question", question);
      form.append("stream", "true");
      options.body = form;
    } else if (state.detailId != null) {
      const body = { id: state.detailId, stream: true };
      if (question) body.question = question;
      options.headers = { "Content-Type": "application/json" };
      options.body = JSON.stringify(body);
    } else {
      return;
    }
    els.answer.classList.add("streaming");
    setText(els.answerStatus, question ? "Thinking…" : "Describing…");
    try {
      const response = await fetch(apiUrl(path), options);
      if (!response.ok) {
        let body = null;
        try { body = await response.json(); } catch (err) { body = null; }
        throw new Error(body && body.error ? body.error : `the server answered ${response.status}`);
      }
      await readEvents(response, (event) => showEvent(event, abort));
    } catch (err) {
      if (abort.signal.aborted) return;
      showAnswerError(err.message);
    } finally {
      if (state.answer === abort) {
        els.answer.classList.remove("streaming");
        state.answer = null;
      }
    }
  }

  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let at;
      while ((at = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, at);
        buffer = buffer.slice(at + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data) onEvent(JSON.parse(data));
      }
    }
  }

  function showEvent(event, abort) {
    if (state.answer !== abort) return;
    if (event.error) { showAnswerError(event.error); return; }
    if (event.done) {
      const usage = event.usage || {};
      const ending = event.finish_reason === "length" ? " · stopped at the token limit" : "";
      setText(els.answerStatus, `${event.model} · ${usage.completion_tokens} tokens${ending}`);
      return;
    }
    if (event.text) {
      els.answer.append(document.createTextNode(shown(event.text)));
      els.answer.dataset.pieces = String(Number(els.answer.dataset.pieces || "0") + 1);
    }
  }

  function showAnswerError(message) {
    els.answer.classList.remove("streaming");
    els.answer.classList.add("error");
    setText(els.answer, message);
    setText(els.answerStatus, "");
  }

  function closeDetail(restoreFocus) {
    if (els.detail.hidden) return;
    els.detail.hidden = true;
    els.backdrop.hidden = true;
    state.detailId = null;
    state.detailUpload = null;
    resetAnswer();
    if (restoreFocus !== false && state.lastCard && document.body.contains(state.lastCard)) state.lastCard.focus();
  }

  // ------------------------------------------------------------------ keyboard
  function cards() { return Array.from(els.results.querySelectorAll(".card")); }

  function columns(list) {
    if (list.length < 2) return 1;
    const top = list[0].getBoundingClientRect().top;
    const n = list.findIndex((c) => c.getBoundingClientRect().top > top + 1);
    return n < 0 ? list.length : n;
  }

  function moveFocus(key) {
    const list = cards();
    if (!list.length) return false;
    const at = list.indexOf(document.activeElement);
    if (at < 0) {
      list[0].focus();
      return true;
    }
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns(list), ArrowDown: columns(list),
      Home: -at, End: list.length - 1 - at }[key];
    const next = Math.min(list.length - 1, Math.max(0, at + step));
    list[next].focus();
    list[next].scrollIntoView({ block: "nearest" });
    return true;
  }

  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (!els.detail.hidden) {
      if (event.key === "Escape") { event.preventDefault(); closeDetail(); return; }
      if ((event.key === "m" || event.key === "M") && !typing && !event.ctrlKey && !event.metaKey) {
        event.preventDefault();
        els.more.click();
        return;
      }
      if ((event.key === "d" || event.key === "D") && !typing && !event.ctrlKey && !event.metaKey && assistantOn()) {
        event.preventDefault();
        els.describe.click();
        return;
      }
      if (event.key === "Tab") trapFocus(event);
      return;
    }
    if (event.key === "/" && !typing) { event.preventDefault(); els.q.focus(); els.q.select(); return; }
    if (event.key === "Escape" && document.activeElement === els.q) { els.q.blur(); return; }
    if (typing) {
      if (event.key === "ArrowDown" && document.activeElement === els.q && cards().length) {
        event.preventDefault();
        cards()[0].focus();
      }
      return;
    }
    if (["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "Home", "End"].includes(event.key)) {
      if (moveFocus(event.key)) event.preventDefault();
    } else if ((event.key === "m" || event.key === "M") && document.activeElement.classList.contains("card")) {
      const id = Number(document.activeElement.dataset.id);
      searchLike(id, document.activeElement.querySelector(".label").textContent);
    }
  });

  function trapFocus(event) {
    const focusable = Array.from(els.detail.querySelectorAll("button, summary, [href], [tabindex]:not([tabindex='-1'])"))
      .filter((n) => !n.hidden && n.offsetParent !== null);
    if (!focusable.length) return;
    const first = focusable[0];
    const last = focusable[focusable.length - 1];
    if (event.shiftKey && document.activeElement === first) { event.preventDefault(); last.focus(); }
    else if (!event.shiftKey && document.activeElement === last) { event.preventDefault(); first.focus(); }
  }

  // ------------------------------------------------------------------ wiring
  els.form.addEventListener("submit", (event) => { event.preventDefault(); searchText(els.q.value); });
  els.k.addEventListener("change", () => rerun());
  els.rerank.addEventListener("change", () => rerun());
  els.upload.addEventListener("change", () => { searchFile(els.upload.files[0]); els.upload.value = ""; });
  els.close.addEventListener("click", () => closeDetail());
  els.backdrop.addEventListener("click", () => closeDetail());
  els.more.addEventListener("click", () => {
    if (state.detailId != null) searchLike(state.detailId, els.title.textContent);
    else if (state.detailUpload) { const file = state.detailUpload; closeDetail(false); searchFile(file); }
  });
  els.describe.addEventListener("click", () => askAssistant(null));
  els.askForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const question = els.question.value.trim();
    if (!question) { els.question.focus(); return; }
    askAssistant(question);
  });

  let dragDepth = 0;
  window.addEventListener("dragenter", (event) => {
    if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
    dragDepth += 1;
    els.dropzone.hidden = false;
  });
  window.addEventListener("dragleave", () => { dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) els.dropzone.hidden = true; });
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    els.dropzone.hidden = true;
    if (event.dataTransfer && event.dataTransfer.files.length) searchFile(event.dataTransfer.files[0]);
  });

  async function start() {
    await loadInfo();
    const params = new URLSearchParams(window.location.search);
    if (params.get("k")) {
      const k = params.get("k");
      if (!Array.from(els.k.options).some((o) => o.value === k)) els.k.append(el("option", { value: k, text: k }));
      els.k.value = k;
    }
    for (const f of params.getAll("filter")) {
      const at = f.indexOf(":");
      const select = at > 0 ? els.filters.querySelector(`select[data-column="${CSS.escape(f.slice(0, at))}"]`) : null;
      if (select) select.value = f.slice(at + 1);
    }
    if (params.get("rerank") === "0") els.rerank.checked = false;
    if (params.get("q")) {
      els.q.value = params.get("q");
      searchText(params.get("q"));
    } else if (params.get("like") && /^\d+$/.test(params.get("like"))) {
      searchLike(Number(params.get("like")));
    } else {
      els.q.focus();
    }
  }
  start();
})();
