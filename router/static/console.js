/* The agent console (docs/console.md). It talks only the documented agent websocket
 * (docs/agent-protocol.md; the session cookie authenticates the upgrade) and the REST API
 * (the cookie, plus the CSRF header on changes). It reconnects by itself and resumes from
 * the last sequence numbers it saw; drafts live in localStorage, so nothing typed is lost.
 * Everything customer-written is set with textContent: never parsed as HTML. */
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var ws = null, pending = {}, nextId = 1, retry = 500, lastSeq = {}, goneWhy = null;
  var offers = {}, conversations = {}, current = null, oldest = null;
  var unread = {}, sla = {}, cannedTimer = null, typingTimer = null, lastTyping = 0;
  var attached = [];  // uploads for the next reply: {blob_key, filename, content_type, size}
  var CHANNEL = {email: "Email", sms: "SMS", voice: "Phone", webchat: "Web chat", messenger: "Messenger", whatsapp: "WhatsApp"};

  var ui = window.omrConsole, el = ui.el, bdi = ui.bdi, line = ui.line, api = ui.api;
  function setStatus(text) { $("status").textContent = text || ""; }
  function channelLabel(c) { return CHANNEL[c] || c || ""; }
  function addressLabel(kind, address) { return kind === "webchat" ? "web-chat visitor" : address; }
  // customer-controlled: shown isolated (console-common.js)
  function nameNode(name) { return bdi(name || "Customer", "name"); }

  // -- REST (cookie + CSRF header) -------------------------------------------------------

  // -- the websocket ---------------------------------------------------------------------
  function command(type, fields) {
    var id = "c" + (nextId++);
    var frame = Object.assign({type: type, id: id}, fields || {});
    return new Promise(function (resolve, reject) {
      if (!ws || ws.readyState !== WebSocket.OPEN) { reject(new Error("offline: try again when the banner is gone")); return; }
      pending[id] = {resolve: resolve, reject: reject};
      ws.send(JSON.stringify(frame));
    });
  }
  function connect() {
    var url = new URL("/ws/agent", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(url.href);
    ws.addEventListener("open", function () { ws.send(JSON.stringify({type: "hello", resume: lastSeq})); });
    ws.addEventListener("message", function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      if (frame.type === "welcome") { onWelcome(frame); }
      else if (frame.type === "signed_out") { goneWhy = frame.message; }
      else if ((frame.type === "ack" || frame.type === "error") && frame.id && pending[frame.id]) {
        var p = pending[frame.id]; delete pending[frame.id];
        if (frame.type === "ack") { p.resolve(frame.result); } else { p.reject(new Error(frame.message)); }
      } else if (frame.type === "error") { setStatus(frame.message); }
      else { onEvent(frame); }
    });
    ws.addEventListener("close", function (event) {
      var signedOut = event.code === 4401;  // the sign-in ended: reconnecting cannot help
      var reason = event.reason || goneWhy || "signed out";
      Object.keys(pending).forEach(function (id) { pending[id].reject(new Error(signedOut ? reason : "offline")); delete pending[id]; });
      if (signedOut) { window.omrConsole.signedOut(reason); setStatus(reason); return; }
      $("banner").hidden = false;
      if (event.code === 1008 && /sign|cookie/.test(event.reason || "")) { location.assign("/console/login"); return; }
      setTimeout(connect, retry); retry = Math.min(retry * 2, 5000);
    });
  }
  function onWelcome(frame) {
    retry = 500; $("banner").hidden = true; setStatus("");
    offers = {}; (frame.state.offers || []).forEach(function (o) { offers[o.offer_id] = o; });
    conversations = {}; (frame.state.conversations || []).forEach(function (c) { conversations[c.conversation_id] = c; });
    Object.keys(frame.streams || {}).forEach(function (s) { if (lastSeq[s] === undefined) { lastSeq[s] = frame.streams[s]; } });
    if (frame.presence) { $("presence").value = frame.presence === "away" ? "away" : "online"; }
    renderOffers(); renderConversations();
    if (current && conversations[current]) { openConversation(current); }
  }
  function onEvent(frame) {
    if (frame.stream && typeof frame.seq === "number") { lastSeq[frame.stream] = frame.seq; }
    var t = frame.type;
    if (t === "offer") { offers[frame.offer_id] = frame; renderOffers(); }
    else if (t === "offer_withdrawn" || t === "offer_expired") { delete offers[frame.offer_id]; renderOffers(); }
    else if (t === "assigned") { conversations[frame.conversation.conversation_id] = frame.conversation; renderConversations(); }
    else if (t === "message") {
      var cid = frame.conversation_id;
      if (cid === current) { appendMessage(frame.message); }
      else if (conversations[cid] && frame.message && frame.message.direction === "in") { unread[cid] = (unread[cid] || 0) + 1; renderConversations(); }
    } else if (t === "delivery") {
      var item = document.getElementById("msg-" + frame.message_id);
      if (item) { item.querySelector(".status").textContent = frame.status + (frame.error ? ": " + frame.error : ""); }
    } else if (t === "conversation_updated" || t === "unassigned" || t === "withdrawn") {
      var c = conversations[frame.conversation_id];
      if (c) {
        if (t !== "conversation_updated" || ["resolved", "queued", "closed"].indexOf(frame.state) >= 0) {
          delete conversations[frame.conversation_id];
          if (current === frame.conversation_id) { closeView(); }
        } else { c.state = frame.state || c.state; }
        renderConversations();
      }
    } else if (t === "sla") { sla[frame.conversation_id] = frame.level; renderConversations(); }
    else if (t === "typing") {
      setStatus("the customer is typing…");
      clearTimeout(typingTimer); typingTimer = setTimeout(function () { setStatus(""); }, 3000);
    } else if (t === "resync_required") { lastSeq = {}; ws.close(); }
  }

  // -- offers and conversations ----------------------------------------------------------
  function renderOffers() {
    var list = $("offers"); list.replaceChildren();
    Object.keys(offers).forEach(function (id) {
      var o = offers[id], c = o.conversation || {};
      var li = el("li", "offer"); li.dataset.offer = id;
      li.appendChild(line("strong", null, [nameNode(c.contact_name), " · " + channelLabel(c.channel) + " · " + (c.queue || "")]));
      li.appendChild(ui.block("div", "preview", c.preview || ""));
      var countdown = el("span", "countdown"); countdown.dataset.expires = o.expires_at || "";
      li.appendChild(countdown);
      var accept = el("button", "accept", "Accept"), reject = el("button", "reject", "Reject");
      accept.type = reject.type = "button";
      accept.addEventListener("click", function () { acceptOffer(Number(id)); });
      reject.addEventListener("click", function () {
        command("reject", {offer_id: Number(id)}).catch(function (e) { setStatus(e.message); });
        delete offers[id]; renderOffers();
      });
      li.appendChild(accept); li.appendChild(reject);
      list.appendChild(li);
    });
    tick();
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll(".countdown").forEach(function (node) {
      var left = Math.max(0, Math.round((Date.parse(node.dataset.expires) - now) / 1000));
      node.textContent = isNaN(left) ? "" : left + " s left";
    });
  }
  function renderConversations() {
    var list = $("conversations"); list.replaceChildren();
    Object.keys(conversations).forEach(function (id) {
      var c = conversations[id], n = Number(id);
      var li = el("li", "conversation" + (n === current ? " current" : "")); li.dataset.conversation = id;
      li.appendChild(line("strong", null, [nameNode(c.contact_name), " "]));
      li.appendChild(el("span", null, channelLabel(c.channel) + " · " + (c.state || "")));
      if (unread[n]) { li.appendChild(el("span", "unread", unread[n])); }
      if (sla[n]) { li.appendChild(el("div", "sla-" + sla[n], sla[n] === "breach" ? "SLA breached" : "SLA at risk")); }
      li.addEventListener("click", function () { openConversation(n); });
      list.appendChild(li);
    });
  }
  function acceptOffer(id) {
    command("accept", {offer_id: id}).then(function (result) {
      var o = offers[id]; delete offers[id]; renderOffers();
      conversations[result.conversation_id] = Object.assign({}, o ? o.conversation : {}, {state: "assigned"});
      openConversation(result.conversation_id, result.timeline);
    }).catch(function (e) { setStatus(e.message); delete offers[id]; renderOffers(); });
  }

  // -- the conversation view -------------------------------------------------------------
  function closeView() { saveDraft(); current = null; $("view").hidden = true; $("empty").hidden = false; }
  function openConversation(id, timeline) {
    if (current !== id) { saveDraft(); attached = []; renderAttached(); }
    current = id; unread[id] = 0; renderConversations();
    $("empty").hidden = true; $("view").hidden = false;
    var c = conversations[id] || {};
    $("title").replaceChildren(nameNode(c.contact_name), document.createTextNode(" · " + channelLabel(c.channel)));
    $("conversation-meta").textContent = "#" + id + " · " + (c.queue || "") + " · " + (c.state || "");
    $("tags").value = (c.tags || []).join(", ");
    $("reply").value = localStorage.getItem("omr-draft-" + id) || "";
    (timeline ? Promise.resolve(timeline) : command("timeline", {conversation_id: id}))
      .then(function (t) { renderTimeline(t, false); }).catch(function (e) { setStatus(e.message); });
    loadContact(c.contact_id, id);
    loadReplyOptions(id);
    loadCanned();
  }
  function renderTimeline(t, older) {
    var list = $("timeline");
    if (!older) { list.replaceChildren(); }
    var first = list.firstChild;
    t.messages.forEach(function (m) {
      var node = messageNode(m);
      if (older) { list.insertBefore(node, first); } else { list.appendChild(node); }
    });
    oldest = t.next_before || null;
    $("older").hidden = !oldest;
    if (!older) { list.scrollTop = list.scrollHeight; }
  }
  function messageNode(m) {
    var li = el("li", "msg " + (m.direction === "in" ? "in" : "out") + (m.is_note ? " note" : "") + (m.is_auto ? " auto" : ""));
    li.id = "msg-" + m.id;
    var label = channelLabel(m.channel) + " · " + (m.author || "") + (m.is_auto ? " · automatic" : "") + (m.is_note ? " · internal note" : "");
    li.appendChild(el("span", "meta", label + " · " + new Date(m.created_at).toLocaleString()));
    if (m.subject) { li.appendChild(ui.block("strong", "subject", m.subject)); }
    li.appendChild(ui.block("div", "text", m.text));
    (m.attachments || []).forEach(function (a, i) {
      var link = line("a", "attachment", ["Attachment: ", ui.fileName(a.filename || "attachment")]);
      if (a.blob_key) { link.href = "/api/messages/" + encodeURIComponent(m.id) + "/attachments/" + i; link.setAttribute("download", ""); }
      li.appendChild(link);
    });
    li.appendChild(el("span", "status", m.direction === "out" && !m.is_note ? (m.delivery_status || "") + (m.error ? ": " + m.error : "") : ""));
    return li;
  }
  function appendMessage(m) {
    var existing = document.getElementById("msg-" + m.id);
    if (existing) { existing.replaceWith(messageNode(m)); return; }
    var list = $("timeline"); list.appendChild(messageNode(m)); list.scrollTop = list.scrollHeight;
  }
  function loadContact(contactId, conversationId) {
    if (!contactId) { return; }
    api("GET", "/api/contacts/" + encodeURIComponent(contactId)).then(function (c) {
      if (current !== conversationId) { return; }
      var dl = $("contact"); dl.replaceChildren();
      [["Name", c.name], ["Email", c.email], ["Phone", c.phone], ["Language", c.language], ["Tier", c.tier], ["VIP", c.vip ? "yes" : "no"]].forEach(function (row) {
        if (row[1] === null || row[1] === undefined) { return; }
        dl.appendChild(el("dt", null, row[0])); dl.appendChild(ui.block("dd", null, row[1]));
      });
      var ids = $("identities"); ids.replaceChildren();
      c.identities.forEach(function (i) {
        ids.appendChild(line("li", i.verified ? "verified" : "unverified", [(i.verified ? "✔ " : "? ") + i.kind + " ", bdi(addressLabel(i.kind, i.address), "address"), i.verified ? "" : " (unverified)"]));
      });
      c.unverified_hints.forEach(function (h) { ids.appendChild(line("li", "unverified", ["? " + h.kind + " ", bdi(h.value, "address"), " (unverified hint)"])); });
    }).catch(function (e) { setStatus(e.message); });
    api("GET", "/api/conversations?contact_id=" + encodeURIComponent(contactId) + "&limit=20").then(function (page) {
      if (current !== conversationId) { return; }
      var list = $("previous"); list.replaceChildren();
      page.items.filter(function (p) { return p.id !== conversationId; }).forEach(function (p) {
        list.appendChild(el("li", null, "#" + p.id + " " + channelLabel(p.channel) + " · " + p.state + " · " + new Date(p.created_at).toLocaleDateString()));
      });
    }).catch(function () {});
  }
  function loadReplyOptions(id) {
    api("GET", "/api/conversations/" + id + "/reply-options").then(function (options) {
      if (current !== id) { return; }
      var select = $("via"); select.replaceChildren();
      options.identities.forEach(function (i) {
        i.inboxes.forEach(function (inbox) {
          var option = el("option", null, channelLabel(inbox.channel) + " · " + ui.isolated(addressLabel(i.kind, i.address)) + (i.verified ? "" : " (unverified)") + (inbox.window !== "open" ? " · window " + inbox.window : "") + (i.opted_out ? " · opted out" : ""));
          option.value = i.identity_id + "|" + inbox.inbox;
          option.disabled = !i.allowed || i.opted_out || inbox.window === "closed";
          option.selected = Boolean(inbox["default"]);
          select.appendChild(option);
        });
      });
      showVia();
    }).catch(function (e) { setStatus(e.message); });
  }
  function showVia() {
    var chosen = $("via").selectedOptions[0];
    $("via-state").textContent = chosen && chosen.disabled ? "not available" : "";
  }
  function loadCanned() {
    if (!current) { return; }
    var id = current, q = $("canned-q").value.trim();
    api("GET", "/api/conversations/" + id + "/canned" + (q ? "?q=" + encodeURIComponent(q) : "")).then(function (items) {
      if (current !== id) { return; }
      var list = $("canned"); list.replaceChildren();
      items.slice(0, 12).forEach(function (item) {
        var li = el("li"), button = el("button", "canned-item", item.name);
        button.type = "button"; button.title = item.text; button.dataset.name = item.name;
        button.addEventListener("click", function () { insertText(item.text); });
        li.appendChild(button); list.appendChild(li);
      });
    }).catch(function () {});
  }
  function insertText(text) {
    var box = $("reply"), start = box.selectionStart, end = box.selectionEnd;
    box.value = box.value.slice(0, start) + text + box.value.slice(end);
    box.focus(); saveDraft();
  }
  function saveDraft() {
    if (!current) { return; }
    var text = $("reply").value;
    if (text) { localStorage.setItem("omr-draft-" + current, text); } else { localStorage.removeItem("omr-draft-" + current); }
  }

  // -- actions ---------------------------------------------------------------------------
  function send() {
    var text = $("reply").value, id = current;
    if (!id || !text.trim()) { return; }
    var note = $("as-note").checked, fields = {conversation_id: id, text: text};
    fields.client_id = sessionStorage.getItem("omr-pending-" + id) || (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random());
    sessionStorage.setItem("omr-pending-" + id, fields.client_id);  // a resend after a drop is the same message
    var via = $("via").value.split("|");
    if (!note && via.length === 2) { fields.identity_id = Number(via[0]); fields.inbox = via[1]; }
    if (attached.length) { fields.attachments = attached.slice(); }
    command(note ? "note" : "reply", fields).then(function () {
      sessionStorage.removeItem("omr-pending-" + id);
      if (current === id) { $("reply").value = ""; $("as-note").checked = false; attached = []; renderAttached(); }
      localStorage.removeItem("omr-draft-" + id);
    }).catch(function (e) { setStatus(e.message); });
  }
  function resolve() {
    var id = current; if (!id) { return; }
    command("resolve", {conversation_id: id}).then(function () {
      delete conversations[id]; localStorage.removeItem("omr-draft-" + id); closeView(); renderConversations();
    }).catch(function (e) { setStatus(e.message); });
  }
  function transfer() {
    var id = current, to = $("transfer-to").value.trim(); if (!id || !to) { return; }
    api("GET", "/api/queues").then(function (queues) {
      var names = (queues.items || queues).map(function (q) { return q.name; });
      return command("transfer", names.indexOf(to) >= 0 ? {conversation_id: id, to_queue: to} : {conversation_id: id, to_agent: to});
    }).then(function () { delete conversations[id]; closeView(); renderConversations(); $("transfer-to").value = ""; })
      .catch(function (e) { setStatus(e.message); });
  }
  function escalate() {
    var id = current; if (!id) { return; }
    var reason = $("reply").value.trim() || "escalated from the console";
    command("escalate", {conversation_id: id, reason: reason}).then(function () { delete conversations[id]; closeView(); renderConversations(); })
      .catch(function (e) { setStatus(e.message); });
  }
  function saveTags() {
    var id = current; if (!id) { return; }
    var tags = $("tags").value.split(",").map(function (t) { return t.trim(); }).filter(Boolean);
    api("PUT", "/api/conversations/" + id + "/tags", {tags: tags}).then(function (r) {
      if (conversations[id]) { conversations[id].tags = r.tags; } setStatus("tags saved");
    }).catch(function (e) { setStatus(e.message); });
  }

  function renderAttached() {
    var list = $("attached"); list.replaceChildren();
    attached.forEach(function (a, i) {
      var li = line("li", null, [ui.fileName(a.filename), " "]), remove = el("button", null, "remove");
      remove.type = "button";
      remove.addEventListener("click", function () { attached.splice(i, 1); renderAttached(); });
      li.appendChild(remove); list.appendChild(li);
    });
  }

  // -- wiring ----------------------------------------------------------------------------
  $("attach").addEventListener("change", function () {
    Array.prototype.forEach.call($("attach").files, function (file) {
      window.omrConsole.upload(file).then(function (a) { attached.push(a); renderAttached(); })
        .catch(function (e) { setStatus(ui.isolated(file.name) + ": " + e.message); });
    });
    $("attach").value = "";
  });
  $("compose").addEventListener("submit", function (event) { event.preventDefault(); send(); });
  $("resolve").addEventListener("click", resolve);
  $("transfer").addEventListener("click", transfer);
  $("escalate").addEventListener("click", escalate);
  $("save-tags").addEventListener("click", saveTags);
  $("via").addEventListener("change", showVia);
  $("older").addEventListener("click", function () {
    if (current && oldest) { command("timeline", {conversation_id: current, before: oldest}).then(function (t) { renderTimeline(t, true); }); }
  });
  $("canned-q").addEventListener("input", function () { clearTimeout(cannedTimer); cannedTimer = setTimeout(loadCanned, 200); });
  $("reply").addEventListener("input", function () {
    saveDraft();
    if (current && Date.now() - lastTyping > 2000 && ws && ws.readyState === WebSocket.OPEN) {
      lastTyping = Date.now(); ws.send(JSON.stringify({type: "typing", conversation_id: current}));
    }
  });
  $("reply").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); send(); }
  });
  $("presence").addEventListener("change", function () {
    command("set_status", {status: $("presence").value}).catch(function (e) { setStatus(e.message); });
  });
  $("logout").addEventListener("click", function () {
    api("POST", "/console/logout", {}).finally(function () { location.assign("/console/login"); });
  });
  document.addEventListener("keydown", function (event) {
    if (!event.altKey) { return; }
    var key = event.key.toLowerCase();
    if (key === "a") { var first = Object.keys(offers)[0]; if (first) { event.preventDefault(); acceptOffer(Number(first)); } }
    else if (key === "r") { event.preventDefault(); $("reply").focus(); }
    else if (key === "s") { event.preventDefault(); resolve(); }
  });
  window.addEventListener("beforeunload", saveDraft);
  setInterval(tick, 1000);

  window.omrConsole.signedIn().then(function (data) {
    if (!data) { return; }

    if (data.user.agent_id === null && data.user.role !== "agent") { location.assign("/console/supervisor"); return; }
    $("me").textContent = data.user.name + " (" + data.user.role + ")";
    connect();
  });
})();
