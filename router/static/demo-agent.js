/* A minimal agent page over the documented agent protocol (docs/agent-protocol.md):
 * accept or reject offers, read the contact's timeline, reply, resolve. It reconnects by
 * itself and resumes from the last sequence number it saw. All text via textContent. */
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var ws = null, pending = {}, nextId = 1, current = null, retry = 500, lastSeq = {};
  var offers = {}, conversations = {};

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function command(type, fields) {
    var id = "r" + (nextId++);
    var frame = Object.assign({type: type, id: id}, fields || {});
    return new Promise(function (resolve, reject) {
      pending[id] = {resolve: resolve, reject: reject};
      ws.send(JSON.stringify(frame));
    });
  }
  function setStatus(text) { $("status").textContent = text; }

  function renderOffers() {
    var list = $("offers"); list.replaceChildren();
    Object.keys(offers).forEach(function (id) {
      var o = offers[id], c = o.conversation;
      var li = el("li", "offer");
      var who = el("strong"); who.appendChild(el("bdi", null, c.contact_name || "Customer"));  // isolated
      who.appendChild(document.createTextNode(" · " + c.channel + " · " + c.queue));
      li.appendChild(who);
      var preview = el("div", "preview", c.preview); preview.dir = "auto"; li.appendChild(preview);
      li.appendChild(el("div", "expires", "expires " + new Date(o.expires_at).toLocaleTimeString()));
      var accept = el("button", "accept", "Accept"); accept.dataset.offer = id;
      var reject = el("button", "reject", "Reject"); reject.dataset.offer = id;
      accept.addEventListener("click", function () { acceptOffer(Number(id)); });
      reject.addEventListener("click", function () { command("reject", {offer_id: Number(id)}).then(function () { delete offers[id]; renderOffers(); }); });
      li.appendChild(accept); li.appendChild(reject);
      list.appendChild(li);
    });
  }
  function renderConversations() {
    var list = $("conversations"); list.replaceChildren();
    Object.keys(conversations).forEach(function (id) {
      var c = conversations[id];
      var li = el("li", "conversation" + (Number(id) === current ? " current" : ""), "#" + id + " ");
      li.appendChild(el("bdi", null, c.contact_name || "Customer"));  // isolated
      li.appendChild(document.createTextNode(" (" + c.channel + ", " + c.state + ")"));
      li.addEventListener("click", function () { openConversation(Number(id)); });
      list.appendChild(li);
    });
  }
  function renderTimeline(timeline) {
    var list = $("timeline"); list.replaceChildren();
    timeline.messages.forEach(appendMessage);
  }
  function appendMessage(m) {
    if (document.getElementById("msg-" + m.id)) {
      document.getElementById("msg-" + m.id).querySelector(".status").textContent = m.delivery_status || "";
      return;
    }
    var li = el("li", "message " + (m.direction === "in" ? "in" : "out") + (m.is_note ? " note" : "") + (m.is_auto ? " auto" : ""));
    li.id = "msg-" + m.id;
    li.appendChild(el("span", "meta", (m.channel || "") + " · " + (m.author || "") + (m.is_auto ? " (automatic)" : "") + (m.is_note ? " (note)" : "")));
    var text = el("div", "text", m.text); text.dir = "auto"; li.appendChild(text);
    li.appendChild(el("span", "status", m.direction === "out" ? m.delivery_status : ""));
    $("timeline").appendChild(li);
    $("timeline").scrollTop = $("timeline").scrollHeight;
  }
  function acceptOffer(id) {
    command("accept", {offer_id: id}).then(function (result) {
      var o = offers[id]; delete offers[id]; renderOffers();
      conversations[result.conversation_id] = o.conversation; conversations[result.conversation_id].state = "assigned";
      current = result.conversation_id; renderConversations(); renderTimeline(result.timeline);
    }).catch(function (e) { setStatus(e.message); delete offers[id]; renderOffers(); });
  }
  function openConversation(id) {
    current = id; renderConversations();
    command("timeline", {conversation_id: id}).then(renderTimeline);
  }

  function onEvent(frame) {
    if (frame.stream && typeof frame.seq === "number") {
      lastSeq[frame.stream] = frame.seq; sessionStorage.setItem("omr-agent-seq", JSON.stringify(lastSeq));
    }
    if (frame.type === "offer") { offers[frame.offer_id] = frame; renderOffers(); }
    else if (frame.type === "offer_withdrawn") { delete offers[frame.offer_id]; renderOffers(); }
    else if (frame.type === "assigned") { conversations[frame.conversation.conversation_id] = frame.conversation; renderConversations(); }
    else if (frame.type === "message") {
      if (frame.conversation_id === current) { appendMessage(frame.message); }
    } else if (frame.type === "delivery") {
      var item = document.getElementById("msg-" + frame.message_id);
      if (item) { item.querySelector(".status").textContent = frame.status + (frame.error ? ": " + frame.error : ""); }
    } else if (frame.type === "conversation_updated") {
      if (conversations[frame.conversation_id]) {
        if (frame.state === "resolved" || frame.state === "queued") { delete conversations[frame.conversation_id]; }
        else { conversations[frame.conversation_id].state = frame.state; }
        renderConversations();
      }
    } else if (frame.type === "typing") { setStatus("the customer is typing…"); setTimeout(function () { setStatus("online"); }, 3000); }
    else if (frame.type === "resync_required") { lastSeq = {}; }
  }

  function connect() {
    var token = $("token").value.trim();
    if (!token) { return; }
    sessionStorage.setItem("omr-agent-token", token);
    var url = new URL("/ws/agent", location.href); url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(url.href);
    ws.addEventListener("open", function () { ws.send(JSON.stringify({type: "hello", token: token, resume: lastSeq})); });
    ws.addEventListener("message", function (event) {
      var frame = JSON.parse(event.data);
      if (frame.type === "welcome") {
        retry = 500; setStatus("online as " + frame.user);
        offers = {}; frame.state.offers.forEach(function (o) { offers[o.offer_id] = o; });
        conversations = {}; frame.state.conversations.forEach(function (c) { conversations[c.conversation_id] = c; });
        Object.keys(frame.streams).forEach(function (s) { if (lastSeq[s] === undefined) { lastSeq[s] = frame.streams[s]; } });
        renderOffers(); renderConversations();
        if (current) { openConversation(current); }
      } else if ((frame.type === "ack" || frame.type === "error") && frame.id && pending[frame.id]) {
        var p = pending[frame.id]; delete pending[frame.id];
        if (frame.type === "ack") { p.resolve(frame.result); } else { p.reject(new Error(frame.message)); }
      } else if (frame.type === "error") {
        setStatus(frame.message);
      } else { onEvent(frame); }
    });
    ws.addEventListener("close", function (event) {
      setStatus(event.code === 4401 ? event.reason || "signed out" : "offline" + (event.reason ? ": " + event.reason : "") + ", reconnecting…");
      if (event.code === 1008 || event.code === 4401) { return; }  // a dead token: no retry
      setTimeout(connect, retry); retry = Math.min(retry * 2, 10000);
    });
  }

  $("login").addEventListener("submit", function (event) { event.preventDefault(); connect(); });
  $("reply").addEventListener("submit", function (event) {
    event.preventDefault();
    var text = $("reply-text").value.trim();
    if (!text || !current) { return; }
    var clientId = (crypto.randomUUID && crypto.randomUUID()) || String(Date.now());
    command("reply", {conversation_id: current, text: text, client_id: clientId}).then(function () { $("reply-text").value = ""; })
      .catch(function (e) { setStatus(e.message); });
  });
  $("resolve").addEventListener("click", function () {
    if (!current) { return; }
    command("resolve", {conversation_id: current}).then(function () {
      delete conversations[current]; current = null; renderConversations(); $("timeline").replaceChildren();
    }).catch(function (e) { setStatus(e.message); });
  });
  try { lastSeq = JSON.parse(sessionStorage.getItem("omr-agent-seq")) || {}; } catch (e) { lastSeq = {}; }
  var saved = sessionStorage.getItem("omr-agent-token");
  if (saved) { $("token").value = saved; connect(); }
})();
