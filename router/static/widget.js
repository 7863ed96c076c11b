/* omniroute web-chat widget.
 *   <script src="https://YOUR-OMNIROUTE/widget.js" data-inbox="web" defer></script>
 * Keeps the visitor token and unacknowledged messages in localStorage: a reload or a
 * dropped connection resends them with the same client ids, and the server drops the
 * duplicates. Everything the agent or visitor wrote is rendered as text (textContent),
 * never as HTML. */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script) { return; }
  var base = new URL(script.src, location.href);
  var inbox = script.getAttribute("data-inbox") || "web";
  var key = "omniroute:" + base.host + ":" + inbox;
  var state = load();
  var ws = null, connected = false, retry = 500, typingSent = 0, typingTimer = null;

  function load() {
    try { return JSON.parse(localStorage.getItem(key)) || {}; } catch (e) { return {}; }
  }
  function save() {
    try { localStorage.setItem(key, JSON.stringify(state)); } catch (e) { /* private mode */ }
  }
  state.pending = state.pending || [];
  state.seen = state.seen || [];

  function uuid() {
    if (window.crypto && crypto.randomUUID) { return crypto.randomUUID(); }
    var b = new Uint8Array(16); crypto.getRandomValues(b);
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }

  var css = el("link"); css.rel = "stylesheet"; css.href = new URL("/widget.css", base).href;
  document.head.appendChild(css);
  var root = el("div", "omr-root");
  var button = el("button", "omr-open", "Chat");
  button.type = "button"; button.setAttribute("aria-label", "Open chat");
  var panel = el("div", "omr-panel"); panel.hidden = true;
  var header = el("div", "omr-header", "Chat with us");
  var status = el("div", "omr-status", "connecting…");
  var list = el("ol", "omr-messages"); list.setAttribute("aria-live", "polite");
  var typing = el("div", "omr-typing", ""); typing.hidden = true;
  var prechat = el("div", "omr-prechat");
  var nameInput = el("input"); nameInput.placeholder = "Your name (optional)"; nameInput.maxLength = 100; nameInput.name = "omr-name";
  var emailInput = el("input"); emailInput.placeholder = "Email (optional)"; emailInput.type = "email"; emailInput.maxLength = 320; emailInput.name = "omr-email";
  prechat.appendChild(nameInput); prechat.appendChild(emailInput);
  var form = el("form", "omr-form");
  var input = el("textarea", "omr-input"); input.rows = 2; input.placeholder = "Type a message"; input.name = "omr-text";
  var send = el("button", "omr-send", "Send"); send.type = "submit";
  var error = el("div", "omr-error", ""); error.hidden = true;
  form.appendChild(input); form.appendChild(send);
  panel.appendChild(header); panel.appendChild(status); panel.appendChild(list); panel.appendChild(typing);
  panel.appendChild(prechat); panel.appendChild(error); panel.appendChild(form);
  root.appendChild(panel); root.appendChild(button);
  document.body.appendChild(root);
  if (state.token) { prechat.hidden = true; }

  button.addEventListener("click", function () {
    panel.hidden = !panel.hidden;
    if (!panel.hidden) { input.focus(); }
  });

  function render(message) {
    var id = message.id ? "m" + message.id : "c" + message.client_id;
    if (message.client_id && document.querySelector('[data-client="' + CSS.escape(message.client_id) + '"]')) {
      var mine = document.querySelector('[data-client="' + CSS.escape(message.client_id) + '"]');
      mine.classList.remove("omr-pending");
      return;
    }
    if (document.getElementById("omr-" + id)) { return; }
    var item = el("li", "omr-msg omr-" + (message.direction === "in" ? "visitor" : "agent"));
    item.id = "omr-" + id;
    if (message.client_id) { item.setAttribute("data-client", message.client_id); }
    if (message.pending) { item.classList.add("omr-pending"); }
    var text = el("span", "omr-text", message.text);
    text.dir = "auto";  // isolated: a right-to-left message or a stray override stays inside
    item.appendChild(text);
    if (message.survey && typeof message.survey.min === "number" && typeof message.survey.max === "number") {
      var scores = el("div", "omr-survey");
      for (var n = message.survey.min; n <= message.survey.max; n++) {
        var choice = el("button", "omr-score", String(n));
        choice.type = "button"; choice.dataset.score = String(n);
        choice.addEventListener("click", function (event) {
          if (!connected) { return; }
          ws.send(JSON.stringify({type: "survey_answer", score: Number(event.target.dataset.score)}));
          scores.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
          event.target.classList.add("omr-chosen");
        });
        scores.appendChild(choice);
      }
      item.appendChild(scores);
    }
    list.appendChild(item);
    list.scrollTop = list.scrollHeight;
  }

  function showError(text) {
    error.textContent = text; error.hidden = !text;
  }

  function connect() {
    var url = new URL("/ws/chat?inbox=" + encodeURIComponent(inbox), base);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(url.href);
    ws.addEventListener("open", function () {
      var hello = {type: "hello", language: (navigator.language || "").slice(0, 2).toLowerCase()};
      if (state.token) { hello.token = state.token; hello.last_seq = state.lastSeq; }
      if (nameInput.value) { hello.name = wellFormed(nameInput.value); }
      if (emailInput.value) { hello.email = wellFormed(emailInput.value); }
      ws.send(JSON.stringify(hello));
    });
    ws.addEventListener("message", function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      if (frame.type === "welcome") {
        connected = true; retry = 500;
        state.token = frame.token; state.lastSeq = frame.last_seq; save();
        header.textContent = frame.title || "Chat";
        status.textContent = ""; status.hidden = true;
        if (frame.max_chars) { input.maxLength = frame.max_chars; }
        if (!frame.history.length && !list.children.length && frame.greeting) { render({id: "greeting", direction: "out", text: frame.greeting}); }
        frame.history.forEach(render);
        state.pending.forEach(function (p) { ws.send(JSON.stringify(messageFrame(p))); });
      } else if (frame.type === "ack") {
        state.pending = state.pending.filter(function (p) { return p.client_id !== frame.client_id; });
        save();
        showError("");
        render({client_id: frame.client_id, direction: "in"});
      } else if (frame.type === "message" && frame.stream) {
        if (typeof frame.seq === "number") { state.lastSeq = Math.max(state.lastSeq || 0, frame.seq); save(); }
        typing.hidden = true;
        render(frame);
      } else if (frame.type === "survey_thanks") {
        render({id: "thanks-" + Date.now(), direction: "out", text: "Thank you for your feedback!"});
      } else if (frame.type === "typing") {
        typing.textContent = "An agent is typing…"; typing.hidden = false;
        clearTimeout(typingTimer); typingTimer = setTimeout(function () { typing.hidden = true; }, 4000);
      } else if (frame.type === "error") {
        if (frame.code === "token_rejected") {  // not a token of this server: a new chat starts
          state.token = null; state.lastSeq = null; save();
          return;
        }
        if (frame.code === "unavailable" && frame.client_id) {  // not stored yet: kept, sent again
          showError("Not delivered yet: retrying…");
          setTimeout(function () {
            var again = state.pending.filter(function (p) { return p.client_id === frame.client_id; })[0];
            if (again && connected) { ws.send(JSON.stringify(messageFrame(again))); }
          }, 1000 * (frame.retry_after || 5));
          return;
        }
        if (frame.client_id) {  // that message was refused and not stored: never resent
          state.pending = state.pending.filter(function (p) { return p.client_id !== frame.client_id; });
          save();
          var refused = document.querySelector('[data-client="' + CSS.escape(frame.client_id) + '"]');
          if (refused) { refused.classList.remove("omr-pending"); refused.classList.add("omr-failed"); }
        }
        showError(frame.message || "Something went wrong");
      }
    });
    ws.addEventListener("close", function (event) {
      connected = false;
      status.hidden = false;
      status.textContent = event.reason ? "disconnected: " + event.reason : "reconnecting…";
      setTimeout(connect, retry + Math.random() * retry);
      retry = Math.min(retry * 2, 15000);
    });
  }

  /* Text the server can store: a lone UTF-16 surrogate (a paste cut in the middle of an
   * emoji by the length limit) would be refused, so it becomes U+FFFD. */
  function wellFormed(text) {
    if (text.toWellFormed) { return text.toWellFormed(); }
    return text.replace(/[\ud800-\udbff](?![\udc00-\udfff])|(^|[^\ud800-\udbff])[\udc00-\udfff]/g, function (m, before) {
      return before === undefined ? "\ufffd" : before + "\ufffd";
    });
  }
  function messageFrame(p) {
    var frame = {type: "message", client_id: p.client_id, text: p.text};
    if (p.name) { frame.name = p.name; }
    if (p.email) { frame.email = p.email; }
    return frame;
  }
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var text = wellFormed(input.value.trim());
    if (!text) { return; }
    showError("");
    var pending = {client_id: uuid(), text: text};
    if (!prechat.hidden) {  // the pre-chat answers travel with the first message
      if (nameInput.value.trim()) { pending.name = wellFormed(nameInput.value.trim()); }
      if (emailInput.value.trim()) { pending.email = wellFormed(emailInput.value.trim()); }
    }
    state.pending.push(pending); save();
    render({client_id: pending.client_id, direction: "in", text: text, pending: true});
    input.value = "";
    prechat.hidden = true;
    if (connected) { ws.send(JSON.stringify(messageFrame(pending))); }
  });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  input.addEventListener("input", function () {
    var now = Date.now();
    if (connected && now - typingSent > 3000) { typingSent = now; ws.send(JSON.stringify({type: "typing"})); }
  });
  window.omniroute = {open: function () { panel.hidden = false; }, state: function () { return state; }};
  connect();
})();
