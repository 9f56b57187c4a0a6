/* MARS console: plain JavaScript, no dependencies. Talks to the server's own API:
 *   GET  /healthz (no key: whether the server has a critic, for the full mode),
 *   GET  /v1/categories, GET /v1/retrievers (the ranked lists: weight sliders, card rank rows),
 *   POST /v1/search, GET /v1/items/{id}, GET /v1/items/{id}/image,
 *   POST /v1/items:bulk, GET /v1/jobs, GET /v1/jobs/{id},
 *   GET/POST /v1/rules, PATCH/DELETE /v1/rules/{id} (merchandising rules: card buttons and the rules panel).
 * Every request carries "Authorization: Bearer <key>" when an API key is saved (localStorage).
 * Pages are hash routes: #/search, #/item/<id>, #/ingest, #/jobs, #/jobs/<id>.
 * Text from the server is always set with textContent (never parsed as HTML). */
"use strict";

(function () {
  const KEY_STORE = "mars.apiKey";
  // The API lives at the path the console is served under, minus "/console/...".
  const BASE = location.pathname.replace(/\/console(\/.*)?$/, "");
  const POLL_MS = 500;

  const state = {
    roomFile: null,        // File of the room photo (picker or drop)
    roomPreviewUrl: null,
    cardUrls: [],          // blob: URLs of the shown product photos (revoked on the next render)
    movedWeights: new Set(),
    jobTimers: new Map(),  // panel id -> timeout of the job being followed there
    lastSearch: null,      // the body of the last search shown (re-sent after a rule changes)
    lastResponse: null,
    rules: null,           // GET /v1/rules, as last loaded
    titles: new Map(),     // product id -> title, from the results seen (names rule targets)
    confirmRule: null,     // id of the rule the confirmation talks about (Undo deletes it)
    retrievers: [],        // GET /v1/retrievers: [{name, label, kind, needs}] in fusion order
    lastPhotoKey: null,    // photoKey() of the room photo of the last search shown (null: none)
    seenPhotos: new Set(), // photoKey()s of room photos searched successfully on this page
    waitTimer: null,       // interval that counts the seconds of the search in flight
    criticNote: "",        // why the server has no critic (GET /healthz critic_note), for the full mode's note
  };

  const $ = (id) => document.getElementById(id);

  /** Build an element: el("p", {class: "x"}, "text", child, ...). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // ---------------------------------------------------------------- API access

  function apiKey() {
    try { return localStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
  }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function errorDetail(res) {
    let text = "";
    try { text = await res.text(); } catch (_) { return res.statusText; }
    try {
      // {"detail": ...} (FastAPI) or a problem+json body (RFC 9457: detail, and errors for bad fields).
      const body = JSON.parse(text);
      const fieldErrors = (list) => list.map((d) => (d.loc ? d.loc.join(".") + ": " : "") + (d.msg || JSON.stringify(d))).join("; ");
      const detail = body && body.detail !== undefined ? body.detail : body;
      let message = Array.isArray(detail) ? fieldErrors(detail) : typeof detail === "string" ? detail : JSON.stringify(detail);
      if (body && Array.isArray(body.errors) && body.errors.length) message += " (" + fieldErrors(body.errors) + ")";
      return message;
    } catch (_) {
      return text.slice(0, 300) || res.statusText;
    }
  }

  /** fetch() against the API with the key; throws ApiError on failure (401/403 also show the key notice). */
  async function api(path, options) {
    const opts = options || {};
    const headers = Object.assign({}, opts.headers || {});
    const key = apiKey();
    if (key) headers["Authorization"] = "Bearer " + key;
    let body = opts.body;
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    let res;
    try {
      res = await fetch(BASE + path, { method: opts.method || "GET", headers, body, cache: "no-cache" });
    } catch (err) {
      throw new ApiError(0, "Cannot reach the MARS server (" + err.message + ").");
    }
    if (res.ok) return res;
    const detail = await errorDetail(res);
    if (res.status === 401 || res.status === 403) {
      showAuthProblem(res.status, detail);
      throw new ApiError(res.status, authMessage(res.status, detail));
    }
    throw new ApiError(res.status, "Error " + res.status + ": " + detail);
  }

  async function apiJson(path, options) {
    return (await api(path, options)).json();
  }

  function authMessage(status, detail) {
    if (status === 401) {
      return (apiKey() ? "The server did not accept the saved API key (401). "
                       : "The server needs an API key (401). ") +
        "Enter a valid key in the “API key” field at the top and press Save key." +
        (detail ? " Server said: " + detail : "");
    }
    return "This API key is not allowed to do that (403)" + (detail ? ": " + detail : "") +
      ". Use a key with the right role.";
  }

  // ---------------------------------------------------------------- notices

  function showNotice(message, kind) {
    $("notice-text").textContent = message;
    $("notice").className = "notice" + (kind ? " notice-" + kind : "");
    $("notice").hidden = false;
  }

  function hideNotice() { $("notice").hidden = true; }

  function showAuthProblem(status, detail) {
    showNotice(authMessage(status, detail), "auth");
    if (status === 401) $("api-key").setAttribute("aria-invalid", "true");  // 403: the key is fine, its role is not
  }

  function showError(err) {
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return; // already shown
    showNotice(err.message || String(err), "error");
  }

  // ---------------------------------------------------------------- API key

  function initKey() {
    $("api-key").value = apiKey();
    renderKeyState();
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("api-key").value.trim();
      try {
        if (value) localStorage.setItem(KEY_STORE, value); else localStorage.removeItem(KEY_STORE);
      } catch (_) { /* private mode: the key lives for this page only */ }
      $("api-key").removeAttribute("aria-invalid");
      hideNotice();
      renderKeyState(value ? "Key saved." : "Key removed.");
      loadCategories();
      loadRetrievers();
      loadRules();
      route();  // reload what the current page shows with the new key
    });
  }

  function renderKeyState(message) {
    $("key-state").textContent = message || (apiKey() ? "Key set" : "No key");
  }

  // ---------------------------------------------------------------- routing

  const VIEWS = ["search", "item", "ingest", "jobs"];

  function route() {
    const hash = location.hash || "#/search";
    let view = "search";
    let arg = null;
    let m;
    if ((m = hash.match(/^#\/item\/(.+)$/))) { view = "item"; arg = decodeURIComponent(m[1]); }
    else if (hash === "#/ingest") view = "ingest";
    else if ((m = hash.match(/^#\/jobs(?:\/(\d+))?$/))) { view = "jobs"; arg = m[1] || null; }
    for (const name of VIEWS) $("view-" + name).hidden = name !== view;
    for (const link of document.querySelectorAll(".nav a")) {
      if (link.dataset.view === view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (view === "item") showItem(arg);
    else if (view === "jobs") showJobs(arg);
    document.title = ({ search: "Search", item: "Item", ingest: "Ingest", jobs: "Jobs" })[view] + " · MARS console";
    return view;
  }

  function focusHeading(id) {
    const heading = $(id);
    if (heading) heading.focus({ preventScroll: false });
  }

  // ---------------------------------------------------------------- categories

  async function loadCategories() {
    let cats;
    try { cats = await apiJson("/v1/categories"); } catch (err) { showError(err); return; }
    const select = $("category");
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "" }, "Any (auto)"));
    const classes = el("optgroup", { label: "Classes" });
    const types = el("optgroup", { label: "Types" });
    for (const c of cats) {
      const option = el("option", { value: c.key }, c.name + " (" + c.products + ")");
      (c.level === "class" ? classes : types).append(option);
    }
    select.append(classes, types);
    select.value = chosen;
    // The rule form's scope: the same categories (a rule stores the key).
    const scope = $("rule-category");
    const scoped = scope.value;
    scope.replaceChildren(el("option", { value: "" }, "any search"),
      ...[classes, types].map((group) => {
        const copy = el("optgroup", { label: group.label });
        for (const o of group.children) copy.append(el("option", { value: o.value }, o.textContent.replace(/ \(\d+\)$/, "")));
        return copy;
      }));
    scope.value = scoped;
  }

  // ---------------------------------------------------------------- room photo

  function setRoomFile(file) {
    if (file && !file.type.startsWith("image/")) {
      showNotice("“" + file.name + "” is not an image; choose a JPEG or PNG room photo.", "error");
      return;
    }
    if (state.roomPreviewUrl) URL.revokeObjectURL(state.roomPreviewUrl);
    state.roomFile = file || null;
    state.roomPreviewUrl = file ? URL.createObjectURL(file) : null;
    $("room-figure").hidden = !file;
    if (file) {
      $("room-preview").src = state.roomPreviewUrl;
      $("room-name").textContent = file.name;
    } else {
      $("room-preview").removeAttribute("src");
      $("room-file").value = "";
    }
  }

  function initRoomPhoto() {
    const zone = $("drop-zone");
    $("room-file").addEventListener("change", () => setRoomFile($("room-file").files[0] || null));
    $("room-clear").addEventListener("click", () => { setRoomFile(null); $("room-file").focus(); });
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (ev) => { ev.preventDefault(); zone.classList.add("dragging"); });
    }
    for (const type of ["dragleave", "dragend"]) {
      zone.addEventListener(type, () => zone.classList.remove("dragging"));
    }
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault();
      zone.classList.remove("dragging");
      const files = ev.dataTransfer && ev.dataTransfer.files;
      if (files && files.length) setRoomFile(files[0]);
    });
  }

  /** A short key for a photo's bytes (given as base64): a 53-bit string hash (cyrb53) and the length.
   *  The server works a photo's regions out once and remembers them; the console tells a photo it
   *  has not searched with yet (a slower search: "Analysing room photo…") by this key. */
  function photoKey(base64) {
    let h1 = 0xdeadbeef, h2 = 0x41c6ce57;
    for (let i = 0; i < base64.length; i++) {
      const c = base64.charCodeAt(i);
      h1 = Math.imul(h1 ^ c, 2654435761);
      h2 = Math.imul(h2 ^ c, 1597334677);
    }
    h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
    h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
    return base64.length + ":" + (h2 >>> 0).toString(16) + ":" + (h1 >>> 0).toString(16);
  }

  function fileBase64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
      reader.onerror = () => reject(new Error("could not read " + file.name));
      reader.readAsDataURL(file);
    });
  }

  // ---------------------------------------------------------------- fusion weights

  function initWeights() {
    $("weight-sliders").addEventListener("input", (ev) => {
      const input = ev.target;
      if (!input.dataset || !input.dataset.weight) return;
      state.movedWeights.add(input.dataset.weight);
      $(input.id + "-out").textContent = Number(input.value).toFixed(2);
    });
    $("weights-reset").addEventListener("click", () => {
      state.movedWeights.clear();
      for (const input of document.querySelectorAll("input[data-weight]")) $(input.id + "-out").textContent = "default";
    });
  }

  /** The ranked lists the server fuses (names and labels from its registry): one weight slider each. */
  async function loadRetrievers() {
    try { state.retrievers = await apiJson("/v1/retrievers"); } catch (err) { showError(err); return; }
    $("weight-sliders").replaceChildren(...state.retrievers.map((r) => {
      const id = "w-" + r.name;
      return el("div", { class: "weight" },
        el("label", { for: id }, r.label),
        el("input", { id, type: "range", min: "0", max: "2", step: "0.05", value: "1", "data-weight": r.name }),
        el("output", { id: id + "-out", for: id }, "default"));
    }));
    state.movedWeights.clear();
    if (state.lastResponse) showUsedWeights(state.lastResponse.fusion);
  }

  /** After a search: sliders the user has not moved show the weights the server used. */
  function showUsedWeights(fusion) {
    for (const input of document.querySelectorAll("input[data-weight]")) {
      const name = input.dataset.weight;
      if (state.movedWeights.has(name)) continue;
      const used = fusion ? fusion[name] : undefined;
      if (typeof used === "number") input.value = String(used);
      $(input.id + "-out").textContent = typeof used === "number" ? "default " + used.toFixed(2) : "default";
    }
  }

  // ---------------------------------------------------------------- critic (full mode)

  /** `text` as nodes, its `backticked` parts (commands such as `mars setup`) as <code>. */
  function withCode(text) {
    return String(text).split("`").map((part, i) => (i % 2 ? el("code", {}, part) : part));
  }

  /** Offer the full mode only when the server has a critic; without one the option is disabled,
   *  its label and the note under the mode say why (`note`: the server's plain sentence). */
  function setCriticReady(ready, note) {
    const option = document.querySelector('#mode option[value="full"]');
    if (note) state.criticNote = note;
    const reason = state.criticNote || "The critic is not set up.";
    option.disabled = !ready;
    option.textContent = ready ? "full (critic)" : "full (no critic)";
    if (ready) option.removeAttribute("title"); else option.title = reason.replaceAll("`", "");
    if (!ready && $("mode").value === "full") $("mode").value = "hybrid";
    $("mode-note").replaceChildren(...(ready ? [] : withCode("Full mode is off. " + reason)));
    $("mode-note").hidden = ready;
    if (ready) $("mode").removeAttribute("aria-describedby"); else $("mode").setAttribute("aria-describedby", "mode-note");
  }

  /** GET /healthz (needs no key): whether the server has a critic. If it cannot be read the
   *  full mode stays offered (a search then says what the critic did). */
  async function loadCritic() {
    let health;
    try {
      const res = await fetch(BASE + "/healthz", { cache: "no-cache" });
      if (!res.ok) return;
      health = await res.json();
    } catch (_) { return; }
    const ready = health.critic !== "none";
    setCriticReady(ready, ready ? "" : health.critic_note);
  }

  // ---------------------------------------------------------------- search

  async function runSearch(ev) {
    if (ev) ev.preventDefault();
    const text = $("q").value.trim();
    if (!text && !state.roomFile) {
      setSearchStatus("Type a query or add a room photo first.");
      $("q").focus();
      return;
    }
    const topK = Math.min(Math.max(parseInt($("top-k").value, 10) || 20, 1), 1000);
    const body = {
      text: text || null,
      category: $("category").value || null,
      auto_lock: $("auto-lock").checked,
      top_k: topK,
      mode: $("mode").value,
      weights: {},
    };
    for (const input of document.querySelectorAll("input[data-weight]")) {
      if (state.movedWeights.has(input.dataset.weight)) body.weights[input.dataset.weight] = Number(input.value);
    }
    const button = $("search-button");
    button.disabled = true;
    const started = performance.now();
    let photo = null;
    try {
      if (state.roomFile) {
        body.image_base64 = await fileBase64(state.roomFile);
        photo = photoKey(body.image_base64);
      }
    } catch (err) {
      button.disabled = false;
      setSearchStatus("The search failed.");
      showError(err);
      return;
    }
    $("rule-confirm").hidden = true;  // a confirmation belongs to the search it re-ran
    await sendSearch(body, "", photo, started);
    button.disabled = false;
  }

  /** POST /v1/search with `body` and show the answer (only the newest of overlapping searches
   *  is shown). `why` is added to the status line, e.g. after a rule change re-ran the search.
   *  `photo` is the photoKey() of its room photo (null: none); `started` when the user asked. */
  async function sendSearch(body, why, photo, started) {
    const token = (state.searchToken = (state.searchToken || 0) + 1);
    const since = started === undefined ? performance.now() : started;
    const newPhoto = photo !== null && photo !== undefined && !state.seenPhotos.has(photo);
    startWaiting(newPhoto ? "Analysing room photo…" : body.mode === "full" ? "Searching (with the critic)…" : "Searching…",
                 since, newPhoto);
    try {
      const response = await apiJson("/v1/search", { method: "POST", json: body });
      if (photo) state.seenPhotos.add(photo);  // the server has worked this photo out now
      if (token !== state.searchToken) return;
      hideNotice();
      state.lastSearch = body;
      state.lastPhotoKey = photo || null;
      state.lastResponse = response;
      renderResults(response, performance.now() - since, why);
    } catch (err) {
      if (token !== state.searchToken) return;
      setSearchStatus("The search failed.");
      showError(err);
    }
  }

  /** Run the last search again (after a rule changed); nothing when there was none. */
  async function rerunSearch(why) {
    if (state.lastSearch) await sendSearch(state.lastSearch, why, state.lastPhotoKey);
  }

  /** The status line says `message` (once: it is a polite live region); a search in flight stops counting. */
  function setSearchStatus(message) {
    stopWaiting();
    $("search-status").textContent = message;
  }

  /** While a search is in flight: the status line says what is happening and counts the seconds
   *  since `started`, every 100 ms. Screen readers hear the words once: the ticking seconds are
   *  aria-hidden, so the live region's spoken text does not change while they tick. */
  function startWaiting(message, started, newPhoto) {
    stopWaiting();
    const seconds = el("span", { class: "wait-seconds", "aria-hidden": "true" });
    const tick = () => { seconds.textContent = ((performance.now() - started) / 1000).toFixed(1) + " s"; };
    tick();
    const status = $("search-status");
    status.replaceChildren(el("span", { class: "wait-text" }, message), " ", seconds);
    status.classList.add("waiting");
    status.dataset.waiting = newPhoto ? "new-photo" : "search";
    $("results").setAttribute("aria-busy", "true");
    state.waitTimer = setInterval(tick, 100);
  }

  function stopWaiting() {
    if (state.waitTimer !== null) clearInterval(state.waitTimer);
    state.waitTimer = null;
    const status = $("search-status");
    status.classList.remove("waiting");
    delete status.dataset.waiting;
    $("results").removeAttribute("aria-busy");
  }

  /** 430 ms, 2.4 s. */
  function duration(ms) {
    return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(1) + " s";
  }

  function renderResults(res, elapsedMs, why) {
    for (const url of state.cardUrls) URL.revokeObjectURL(url);
    state.cardUrls = [];
    const n = res.items.length;
    setSearchStatus(n + (n === 1 ? " result" : " results") + " in " + duration(elapsedMs) + " (" + res.mode + " mode)" +
      (why ? " — " + why : "") + ".");

    const lock = res.lock;
    $("lock-what").textContent = lock.applied ? (lock.name || lock.key) + " (" + lock.level + ")" : "none";
    $("lock-reason").textContent = lock.reason;
    const synonyms = res.synonyms || [];
    $("synonyms-what").textContent = synonyms.join("; ");
    $("rewritten-text").textContent = res.rewritten_text || "";
    $("synonyms-line").hidden = !synonyms.length;
    const critic = res.critic;  // a critic line in full mode only (other modes never run it)
    $("critic-line").replaceChildren(...withCode(res.mode !== "full" ? "" : critic.status === "not configured"
      ? "Critic: " + critic.detail
      : "Critic: " + critic.backend + " — " + critic.status +
        (critic.scored ? " " + critic.scored + " items" : "") + (critic.detail ? " — " + critic.detail : "")));
    $("critic-line").hidden = res.mode !== "full";
    const absent = (res.stages && res.stages.absent) || [];  // trained stages this search had to do without
    $("stages-what").textContent = absent.join(" ");
    $("stages-line").hidden = !absent.length;
    if (res.stages) setCriticReady(res.stages.critic === "ready", critic.status === "not configured" ? critic.detail : "");
    $("lock-why").hidden = false;
    showUsedWeights(res.fusion);
    renderScopeChoices();

    for (const item of res.items) state.titles.set(item.id, item.title);
    const list = $("results");
    list.replaceChildren(...res.items.map(card));
    renderRules();  // the targets' titles may be known now
  }

  function stageText(hit) { return hit ? "#" + hit.rank : "–"; }

  function card(item) {
    const p = item.provenance;
    const link = "#/item/" + encodeURIComponent(item.id);
    const img = el("img", { class: "card-img", alt: item.title || item.id, loading: "lazy", decoding: "async" });
    const ranks = el("dl", { class: "ranks" });
    // one row per list this search fused (the server's weights name them), in fusion order, then the fused rank
    const used = (name) => state.lastResponse && typeof state.lastResponse.fusion[name] === "number";
    const lists = state.retrievers.length ? state.retrievers : Object.keys(p.retrievers).map((name) => ({ name, label: name }));
    const stages = lists.filter((r) => used(r.name)).map((r) => [r.label, p.retrievers[r.name]]);
    stages.push(["Fused", p.fused]);
    for (const [label, hit] of stages) {
      ranks.append(el("div", null, el("dt", null, label), el("dd", null, stageText(hit))));
    }
    const notes = p.rules || [];
    const name = item.title || item.id;
    const node = el("li", { class: "card" + (notes.some((n) => n.startsWith("pinned")) ? " card-pinned" : ""), "data-id": item.id },
      el("a", { href: link, class: "card-photo", tabindex: "-1", "aria-hidden": "true" }, img),
      el("h3", { class: "card-title" }, el("span", { class: "rank" }, item.rank + ". "), el("a", { href: link }, name)),
      el("p", { class: "card-meta" }, [item.type, item.colour].filter(Boolean).join(" · ") || "—"),
      el("p", { class: "card-score" }, "Score ", el("strong", null, item.score.toFixed(4))),
      ranks,
      p.critic
        ? el("p", { class: "rationale" }, el("span", { class: "critic-score" }, "Critic " + p.critic.score.toFixed(2) + ": "), p.critic.rationale)
        : null,
      // Merchandising rules: what they did to this item, and buttons to add one for it.
      el("div", { class: "card-rules", "data-slot": "merch-rules" },
        notes.length
          ? el("ul", { class: "rule-notes", "aria-label": "Rules applied to " + name }, ...notes.map((n) => el("li", null, n)))
          : null,
        el("div", { class: "rule-actions", role: "group", "aria-label": "Add a rule for " + name },
          ...CARD_ACTIONS.map((a) => {
            const button = el("button", { type: "button", "data-action": a.kind, "aria-label": a.label + " " + name + " " + a.what,
                                          title: a.label + " " + a.what }, a.label);
            button.addEventListener("click", () => cardRule(a, item, button));
            return button;
          }))),
    );
    loadPhoto(img, item.id, item.image);
    return node;
  }

  /** Show a product photo: a catalog URL as it is, a stored file through the API (with the key). */
  async function loadPhoto(img, id, image) {
    if (!image) { img.replaceWith(el("span", { class: "no-photo" }, "no photo")); return; }
    if (/^https?:\/\//i.test(image)) { img.src = image; return; }
    try {
      const res = await api("/v1/items/" + encodeURIComponent(id) + "/image");
      const url = URL.createObjectURL(await res.blob());
      state.cardUrls.push(url);
      img.src = url;
    } catch (err) {
      img.replaceWith(el("span", { class: "no-photo" }, "photo unavailable"));
    }
  }

  /** Back on the search page: focus the card the user came from, else the query box. */
  function focusSearch() {
    const from = state.lastItem && document.querySelector('.card[data-id="' + CSS.escape(state.lastItem) + '"] .card-title a');
    (from || $("q")).focus();
  }

  // ---------------------------------------------------------------- merchandising rules

  /** The buttons of a result card: each makes one rule for the card's product, scoped by #rule-scope. */
  const CARD_ACTIONS = [
    { kind: "pin", label: "Pin", what: "at #1", fields: { position: 1 } },
    { kind: "boost", label: "Boost", what: "x1.5", fields: { factor: 1.5 } },
    { kind: "bury", label: "Bury", what: "x0.5", fields: { factor: 0.5 } },
  ];

  const MAX_PATTERN = 200;  // the API's longest query_pattern

  function hasWords(text) { return /[\p{L}\p{N}_]/u.test(text || ""); }

  function lockName(lock) { return (lock.name || lock.key) + " (" + lock.level + ")"; }

  /** The scope fields of a card's rule from #rule-scope and the last search, and how to say it;
   *  {error} when the last search cannot give that scope. */
  function cardScope() {
    const res = state.lastResponse;
    const lock = res && res.lock.applied ? res.lock : null;
    const text = ((state.lastSearch && state.lastSearch.text) || "").trim();
    const usable = hasWords(text) && text.length <= MAX_PATTERN;
    const lockScope = lock && { fields: { category: lock.key }, says: "searches locked to " + lockName(lock) };
    const textScope = usable && { fields: { query_pattern: text }, says: "queries saying “" + text + "”" };
    const textProblem = !hasWords(text) ? "this search has no query text"
      : "its text is longer than " + MAX_PATTERN + " characters";
    switch ($("rule-scope").value) {
      case "lock": return lockScope || { error: "this search has no category lock" };
      case "query": return textScope || { error: textProblem };
      case "both":
        if (!lockScope) return { error: "this search has no category lock" };
        if (!textScope) return { error: textProblem };
        return { fields: Object.assign({}, lockScope.fields, textScope.fields), says: lockScope.says + " whose text says “" + text + "”" };
      case "all": return { fields: {}, says: "every search" };
      default:
        return lockScope || textScope ||
          { error: "this search has neither a category lock nor usable query text (" + textProblem + ")" };
    }
  }

  /** After a search: the scope choices name this search's lock and text. */
  function renderScopeChoices() {
    const res = state.lastResponse;
    const lock = res && res.lock.applied ? res.lock : null;
    const text = ((state.lastSearch && state.lastSearch.text) || "").trim();
    const quoted = hasWords(text) ? "“" + (text.length > 40 ? text.slice(0, 39) + "…" : text) + "”" : "(no text)";
    const labels = {
      auto: "auto: " + (lock ? "the lock " + lockName(lock) : hasWords(text) ? "the text " + quoted : "— no lock, no text"),
      lock: "this search's lock" + (lock ? " " + lockName(lock) : " (none)"),
      query: "this search's text " + quoted,
      both: "this lock and this text",
      all: "every search",
    };
    for (const option of $("rule-scope").options) option.textContent = labels[option.value];
  }

  /** A card's Pin / Boost / Bury: create the rule, say what and where, re-run the search. */
  async function cardRule(action, item, button) {
    const scope = cardScope();
    if (scope.error) {
      showNotice("Cannot " + action.label.toLowerCase() + " “" + (item.title || item.id) + "” for this search: " + scope.error +
        ". Choose another scope in “Pin / Boost / Bury on a card apply to”.", "error");
      $("rule-scope").focus();
      return;
    }
    const body = Object.assign({ kind: action.kind, product_id: item.id }, action.fields, scope.fields);
    button.disabled = true;
    let rule;
    try {
      rule = await apiJson("/v1/rules", { method: "POST", json: body });
    } catch (err) {
      button.disabled = false;
      showError(err);
      return;
    }
    hideNotice();
    $("rule-form-status").textContent = "";  // an older message of the form is stale now
    showRuleConfirm(rule, action.label.toLowerCase() + " " + (item.title || item.id) + " " + action.what + " for " + scope.says);
    await Promise.all([loadRules(), rerunSearch("re-run after rule " + rule.id + " was added")]);
    // Keyboard users stay on the product they acted on (its card moved or was re-drawn).
    const again = document.querySelector('.card[data-id="' + CSS.escape(item.id) + '"] button[data-action="' + action.kind + '"]');
    if (again) again.focus(); else $("results-heading").focus();
  }

  function showRuleConfirm(rule, message) {
    state.confirmRule = rule.id;
    $("rule-confirm-text").textContent = "Rule " + rule.id + " added: " + message + ".";
    $("rule-confirm-text").title = rule.summary;  // the server's wording (product id, lock key)
    $("rule-undo").hidden = false;
    $("rule-confirm").hidden = false;
  }

  async function undoRule() {
    const id = state.confirmRule;
    if (!id) return;
    if (await deleteRule(id)) {
      $("rule-confirm-text").textContent = "Rule " + id + " removed.";
      $("rule-undo").hidden = true;
      $("results-heading").focus();
    }
  }

  /** GET /v1/rules into the panel. */
  async function loadRules() {
    try {
      state.rules = await apiJson("/v1/rules");
    } catch (err) {
      showError(err);
      return;
    }
    renderRules();
  }

  function ruleTarget(rule) {
    if (rule.kind === "synonym") return "“" + rule.term + "”";
    if (rule.brand) return "brand " + rule.brand;
    const title = state.titles.get(rule.product_id);
    return rule.product_id + (title ? " (" + title + ")" : "");
  }

  function ruleScopeText(rule) {
    const parts = [];
    if (rule.category) parts.push("lock " + rule.category);
    if (rule.query_pattern) parts.push("query says “" + rule.query_pattern + "”");
    return parts.length ? parts.join(" and ") : "every search";
  }

  function ruleSetting(rule) {
    if (rule.kind === "pin") return "#" + rule.position;
    if (rule.kind === "synonym") return "→ “" + rule.replacement + "”";
    return "x" + rule.factor;
  }

  function renderRules() {
    const rules = state.rules;
    if (!rules) return;
    const active = rules.filter((r) => r.active).length;
    $("rules-count").textContent = rules.length
      ? "— " + rules.length + (rules.length === 1 ? " rule, " : " rules, ") + active + " active"
      : "— none yet";
    const rows = rules.map((rule) => {
      const toggle = el("input", { type: "checkbox", "aria-label": "Rule " + rule.id + " active", checked: rule.active });
      toggle.addEventListener("change", () => setRuleActive(rule.id, toggle));
      const remove = el("button", { type: "button", class: "small", "aria-label": "Delete rule " + rule.id }, "Delete");
      remove.addEventListener("click", () => deleteRule(rule.id, remove));
      return el("tr", { "data-rule": rule.id, class: rule.active ? null : "inactive", title: rule.summary +
                        (rule.created_by ? " — by " + rule.created_by : "") },
        el("td", null, "#" + rule.id),
        el("td", null, rule.kind),
        el("td", { class: "target" }, ruleTarget(rule)),
        el("td", null, ruleScopeText(rule)),
        el("td", null, ruleSetting(rule)),
        el("td", null, toggle),
        el("td", null, remove));
    });
    if (!rows.length) rows.push(el("tr", null, el("td", { colspan: "7", class: "muted" }, "No rules yet: use a card's Pin, Boost or Bury, or the form.")));
    $("rules-table").tBodies[0].replaceChildren(...rows);
  }

  async function setRuleActive(id, toggle) {
    toggle.disabled = true;
    try {
      await apiJson("/v1/rules/" + id, { method: "PATCH", json: { active: toggle.checked } });
      hideNotice();
    } catch (err) {
      toggle.checked = !toggle.checked;
      toggle.disabled = false;
      showError(err);
      return;
    }
    const on = toggle.checked;
    await Promise.all([loadRules(), rerunSearch("re-run after rule " + id + " was turned " + (on ? "on" : "off"))]);
    const again = document.querySelector('#rules-table tr[data-rule="' + id + '"] input[type=checkbox]');
    if (again) again.focus();
  }

  /** DELETE /v1/rules/{id}, then reload the list and re-run the search; true when deleted. */
  async function deleteRule(id, button) {
    if (button) button.disabled = true;
    try {
      await api("/v1/rules/" + id, { method: "DELETE" });
      hideNotice();
    } catch (err) {
      if (button) button.disabled = false;
      showError(err);
      return false;
    }
    if (state.confirmRule === id && button) $("rule-confirm").hidden = true;
    const rows = [...$("rules-table").tBodies[0].rows];
    const index = rows.findIndex((row) => row.dataset.rule === String(id));
    await Promise.all([loadRules(), rerunSearch("re-run after rule " + id + " was deleted")]);
    if (button) {  // keyboard: on to the next rule's Delete (or the form when none is left)
      const next = $("rules-table").tBodies[0].rows[Math.max(index, 0)];
      const target = next && next.querySelector("button");
      (target || $("rule-kind")).focus();
    }
    return true;
  }

  /** Show the form's fields that the chosen kind uses (hidden ones are not sent). */
  function showRuleFields() {
    const kind = $("rule-kind").value;
    for (const field of document.querySelectorAll("#rule-form [data-kinds]")) {
      field.hidden = !field.dataset.kinds.split(" ").includes(kind);
    }
    if (kind === "boost" || kind === "bury") {
      const factor = $("rule-factor");
      const value = Number(factor.value);
      if (kind === "boost" && !(value > 1)) factor.value = "1.5";
      if (kind === "bury" && !(value > 0 && value < 1)) factor.value = "0.5";
    }
  }

  async function addRule(ev) {
    ev.preventDefault();
    const kind = $("rule-kind").value;
    const body = { kind, active: $("rule-active").checked };
    const text = (id) => $(id).value.trim() || null;
    const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
    if (kind === "pin") Object.assign(body, { product_id: text("rule-product"), position: number("rule-position") });
    else if (kind === "synonym") Object.assign(body, { term: text("rule-term"), replacement: text("rule-replacement") });
    else Object.assign(body, { product_id: text("rule-product"), brand: text("rule-brand"), factor: number("rule-factor") });
    body.category = $("rule-category").value || null;
    body.query_pattern = text("rule-pattern");
    for (const name of Object.keys(body)) if (body[name] === null) delete body[name];
    const status = $("rule-form-status");
    const button = $("rule-add");
    button.disabled = true;
    status.className = "rule-form-status";
    status.textContent = "Adding…";
    let rule;
    try {
      rule = await apiJson("/v1/rules", { method: "POST", json: body });
    } catch (err) {
      status.className = "rule-form-status error";
      status.textContent = "Not added: " + err.message;
      showError(err);
      return;
    } finally {
      button.disabled = false;
    }
    hideNotice();
    status.textContent = "Rule " + rule.id + " added: " + rule.summary + ".";
    for (const id of ["rule-product", "rule-brand", "rule-term", "rule-replacement"]) $(id).value = "";
    await Promise.all([loadRules(), rerunSearch("re-run after rule " + rule.id + " was added")]);
  }

  function initRules() {
    $("rule-kind").addEventListener("change", showRuleFields);
    $("rule-form").addEventListener("input", () => { $("rule-form-status").textContent = ""; });
    $("rule-form").addEventListener("submit", addRule);
    $("rule-undo").addEventListener("click", undoRule);
    $("rule-confirm-close").addEventListener("click", () => { $("rule-confirm").hidden = true; $("results-heading").focus(); });
    showRuleFields();
  }

  // ---------------------------------------------------------------- item page

  async function showItem(id) {
    state.lastItem = id;
    const body = $("item-body");
    $("item-heading").textContent = "Item " + id;
    body.replaceChildren(el("p", { role: "status" }, "Loading…"));
    const token = (state.itemToken = (state.itemToken || 0) + 1);
    let item;
    try {
      item = await apiJson("/v1/items/" + encodeURIComponent(id));
    } catch (err) {
      if (token !== state.itemToken) return;
      body.replaceChildren(el("p", { class: "error", role: "status" }, err.status === 404 ? "No item " + id + "." : err.message));
      return;
    }
    if (token !== state.itemToken) return;  // a newer item page was opened meanwhile
    $("item-heading").textContent = item.title || item.id;
    const img = el("img", { class: "item-img", alt: item.title || item.id });
    const facts = el("dl", { class: "facts" });
    const rows = [["ID", item.id], ["Type", item.type], ["Colour", item.colour], ["Size", item.size],
                  ["Categories", item.categories.join(", ")], ["Photo", item.image || "none"],
                  ["Content hash", item.content_hash]];
    for (const [name, value] of Object.entries(item.attributes || {})) {
      rows.push([name, typeof value === "string" ? value : JSON.stringify(value)]);
    }
    for (const [label, value] of rows) facts.append(el("dt", null, label), el("dd", null, value || "—"));
    body.replaceChildren(
      el("div", { class: "item-photo" }, img),
      el("div", { class: "item-info" }, el("p", { class: "item-text" }, item.text || ""), facts),
    );
    loadPhoto(img, item.id, item.image);
  }

  // ---------------------------------------------------------------- jobs

  function percent(job) {
    if (job.status === "done") return 100;
    return job.total ? Math.floor((100 * job.done) / job.total) : 0;
  }

  function renderJob(panel, job) {
    const pct = percent(job);
    const label = "job-" + panel.id + "-progress";
    const counts = "indexed " + job.indexed + ", unchanged " + job.unchanged + ", rejected " + job.rejected +
      (job.queued ? ", waiting " + job.queued : "");
    const children = [
      el("h2", null, "Job #" + job.id + " — " + job.status),
      el("p", { class: "muted" }, "Source: " + job.source),
      el("label", { for: label }, "Progress"),
      el("div", { class: "progress-row" },
        el("progress", { id: label, class: "job-progress", max: "100", value: String(pct), "data-percent": String(pct) }),
        el("span", { class: "percent" }, pct + "%")),
      el("p", { class: "job-counts" }, job.done + " of " + job.total + " records: " + counts +
        (job.eta_s !== null && job.eta_s !== undefined ? " — about " + Math.ceil(job.eta_s) + " s left" : "") +
        (job.items_per_s ? " — " + job.items_per_s.toFixed(1) + " items/s" : "")),
    ];
    if (job.error) children.push(el("p", { class: "error" }, "Error: " + job.error));
    if (job.rejections && job.rejections.length) {
      const list = el("ul", { class: "rejections" });
      for (const r of job.rejections) {
        list.append(el("li", null, "Record " + r.position + (r.record_id ? " (" + r.record_id + ")" : "") + ": " + r.reason));
      }
      children.push(el("h3", null, "Rejected records"), list);
    }
    panel.replaceChildren(...children);
    panel.hidden = false;
    panel.dataset.status = job.status;
  }

  /** Poll GET /v1/jobs/{id} into `panel` until the job is done or failed. */
  function followJob(panel, jobId) {
    clearTimeout(state.jobTimers.get(panel.id));
    const tick = async () => {
      let job;
      try {
        job = await apiJson("/v1/jobs/" + jobId);
      } catch (err) {
        showError(err);
        return;
      }
      renderJob(panel, job);
      if (job.status !== "done" && job.status !== "failed") {
        state.jobTimers.set(panel.id, setTimeout(tick, POLL_MS));
      } else if (!$("view-jobs").hidden) {
        loadJobs();
      }
    };
    tick();
  }

  async function startBulk(ev, request) {
    ev.preventDefault();
    const button = ev.target.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const accepted = await apiJson("/v1/items:bulk", request);
      hideNotice();
      const panel = $("ingest-job");
      panel.replaceChildren(el("p", { role: "status" }, "Job #" + accepted.job_id + " queued (" + accepted.total + " records)…"));
      panel.hidden = false;
      followJob(panel, accepted.job_id);
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
    }
  }

  function initIngest() {
    $("ingest-lines-form").addEventListener("submit", (ev) => {
      const lines = $("jsonl").value.trim();
      if (!lines) { ev.preventDefault(); showNotice("Paste at least one JSON line.", "error"); $("jsonl").focus(); return; }
      startBulk(ev, { method: "POST", body: lines + "\n", headers: { "Content-Type": "application/x-ndjson" } });
    });
    $("ingest-path-form").addEventListener("submit", (ev) => {
      const path = $("server-path").value.trim();
      if (!path) { ev.preventDefault(); showNotice("Give the path of a catalog on the server.", "error"); $("server-path").focus(); return; }
      const mapping = $("mapping").value.split(/[\s,]+/).filter(Boolean);
      startBulk(ev, { method: "POST", json: { path, mapping } });
    });
  }

  async function loadJobs() {
    let jobs;
    try { jobs = await apiJson("/v1/jobs?limit=50"); } catch (err) { showError(err); return; }
    const rows = jobs.map((job) => {
      const pct = percent(job);
      return el("tr", null,
        el("td", null, el("a", { href: "#/jobs/" + job.id }, "#" + job.id)),
        el("td", { class: "source" }, job.source),
        el("td", null, job.status),
        el("td", null, el("progress", { max: "100", value: String(pct), "aria-label": "Job " + job.id + " progress" }), " " + pct + "%"),
        el("td", { class: "num" }, String(job.indexed)),
        el("td", { class: "num" }, String(job.unchanged)),
        el("td", { class: "num" }, String(job.rejected)),
        el("td", null, job.started_at ? new Date(job.started_at).toLocaleString() : "—"));
    });
    if (!rows.length) rows.push(el("tr", null, el("td", { colspan: "8" }, "No jobs yet.")));
    $("jobs-table").tBodies[0].replaceChildren(...rows);
  }

  function showJobs(jobId) {
    loadJobs();
    const panel = $("jobs-detail");
    if (jobId) followJob(panel, jobId);
    else { clearTimeout(state.jobTimers.get(panel.id)); panel.hidden = true; }
  }

  // ---------------------------------------------------------------- start

  function init() {
    initKey();
    initRoomPhoto();
    initWeights();
    initIngest();
    initRules();
    $("notice-close").addEventListener("click", hideNotice);
    $("search-form").addEventListener("submit", runSearch);
    $("jobs-refresh").addEventListener("click", loadJobs);
    window.addEventListener("hashchange", () => {
      const view = route();
      if (view === "search") focusSearch();
      else if (view === "item") focusHeading("item-heading");
      else if (view === "ingest") focusHeading("ingest-heading");
      else if (view === "jobs") focusHeading("jobs-heading");
    });
    route();
    loadCritic();
    loadCategories();
    loadRetrievers();
    loadRules();
    if ($("view-search").hidden === false) $("q").focus();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
