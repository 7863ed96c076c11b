/* The supervisor dashboard (docs/console.md): queues and agents live over /ws/supervisor,
 * actions through the REST API (cookie + CSRF header). Text is always set as text. */
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var ws = null, retry = 500, agents = [], refreshTimer = null, goneWhy = null;
  var SVG = "http://www.w3.org/2000/svg";

  var ui = window.omrConsole, el = ui.el, api = ui.api;
  function cell(text, cls) { return el("td", cls, text); }
  function setStatus(text) { $("status").textContent = text || ""; }
  function seconds(s) {
    s = Math.round(s || 0);
    return s < 60 ? s + " s" : Math.floor(s / 60) + " min " + (s % 60) + " s";
  }

  // -- live ------------------------------------------------------------------------------
  function connect() {
    var url = new URL("/ws/supervisor", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(url.href);
    ws.addEventListener("open", function () { ws.send(JSON.stringify({type: "hello"})); });
    ws.addEventListener("message", function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      if (frame.type === "welcome") { retry = 500; $("banner").hidden = true; }
      else if (frame.type === "snapshot") { renderQueues(frame.queues); renderAgents(frame.agents); scheduleRefresh(); }
      else if (frame.type === "csat") { addRating(frame); loadCharts(); }
      else if (frame.type === "error") { setStatus(frame.message); }
      else if (frame.type === "signed_out") { goneWhy = frame.message; }
    });
    ws.addEventListener("close", function (event) {
      if (event.code === 4401) {  // the sign-in ended: show why, reconnecting cannot help
        var reason = event.reason || goneWhy || "signed out";
        window.omrConsole.signedOut(reason); setStatus(reason); return;
      }
      $("banner").hidden = false;
      if (event.code === 1008) { setStatus(event.reason); if (/sign|cookie/.test(event.reason || "")) { location.assign("/console/login"); } return; }
      setTimeout(connect, retry); retry = Math.min(retry * 2, 5000);
    });
  }
  function renderQueues(queues) {
    var body = $("queues"); body.replaceChildren();
    queues.forEach(function (q) {
      var tr = el("tr"); tr.dataset.queue = q.name;
      tr.appendChild(cell(q.name));
      tr.appendChild(cell(q.waiting, "num waiting"));
      tr.appendChild(cell(seconds(q.longest_wait_seconds), "num"));
      tr.appendChild(cell(q.offered, "num"));
      tr.appendChild(cell(q.assigned, "num"));
      tr.appendChild(cell(q.sla_at_risk, "num" + (q.sla_at_risk ? " at-risk" : "")));
      tr.appendChild(cell(q.sla_breached, "num" + (q.sla_breached ? " breached" : "")));
      body.appendChild(tr);
    });
  }
  function renderAgents(list) {
    agents = list;
    var body = $("agents"); body.replaceChildren();
    list.forEach(function (a) {
      var tr = el("tr"); tr.dataset.agent = a.user;
      var who = el("td"); who.appendChild(ui.bdi(a.name, "name")); who.appendChild(document.createTextNode(" (" + a.user + ")"));
      tr.appendChild(who);
      var td = el("td"), select = el("select", "presence");
      ["online", "away", "offline"].forEach(function (p) {
        var option = el("option", null, p); option.value = p; option.selected = a.presence === p; select.appendChild(option);
      });
      select.addEventListener("change", function () {
        api("POST", "/api/agents/" + a.id + "/status", {status: select.value}).catch(function (e) { setStatus(e.message); });
      });
      td.appendChild(select); td.appendChild(document.createTextNode(a.busy ? " busy" : ""));
      tr.appendChild(td);
      var load = Object.keys(a.load).filter(function (k) { return k !== "total" && a.load[k].cap > 0; }).map(function (k) { return k + " " + a.load[k].used + "/" + a.load[k].cap; });
      tr.appendChild(cell(load.join(" · ")));
      body.appendChild(tr);
    });
  }
  function scheduleRefresh() { clearTimeout(refreshTimer); refreshTimer = setTimeout(loadOpen, 150); }

  // -- open conversations: reassign and monitor ------------------------------------------
  function loadOpen() {
    Promise.all(["queued", "offered", "assigned", "waiting_customer"].map(function (state) {
      return api("GET", "/api/conversations?state=" + state + "&limit=50").then(function (page) { return page.items; });
    })).then(function (lists) {
      var body = $("open"); body.replaceChildren();
      var names = {}; agents.forEach(function (a) { names[a.id] = a.user; });
      [].concat.apply([], lists).sort(function (x, y) { return x.id - y.id; }).forEach(function (c) {
        var tr = el("tr"); tr.dataset.conversation = String(c.id);
        tr.appendChild(cell("#" + c.id)); tr.appendChild(cell(c.queue || "")); tr.appendChild(cell(c.channel));
        tr.appendChild(cell(c.state)); tr.appendChild(cell(names[c.agent_id] || ""));
        var td = el("td"), pick = el("select", "reassign-to");
        agents.forEach(function (a) { var o = el("option", null, a.user); o.value = a.user; pick.appendChild(o); });
        var go = el("button", "reassign", "Reassign"); go.type = "button";
        go.addEventListener("click", function () {
          api("POST", "/api/conversations/" + c.id + "/assign", {agent: pick.value}).then(function () { setStatus("#" + c.id + " assigned to " + pick.value); loadOpen(); })
            .catch(function (e) { setStatus(e.message); });
        });
        var watch = el("button", "monitor", "Monitor"); watch.type = "button";
        watch.addEventListener("click", function () { monitor(c.id); });
        td.appendChild(pick); td.appendChild(go); td.appendChild(watch); tr.appendChild(td);
        body.appendChild(tr);
      });
    }).catch(function (e) { setStatus(e.message); });
  }
  function monitor(id) {
    api("GET", "/api/conversations/" + id).then(function (detail) {
      $("monitor-panel").hidden = false;
      $("monitor-title").textContent = "Monitoring #" + id + " (" + detail.conversation.channel + ", " + detail.conversation.state + ")";
      var list = $("monitor"); list.replaceChildren();
      detail.timeline.messages.forEach(function (m) {
        var li = el("li", "msg " + (m.direction === "in" ? "in" : "out") + (m.is_note ? " note" : ""));
        li.appendChild(el("span", "meta", (m.channel || "") + " · " + m.author));
        if (m.subject) { li.appendChild(ui.block("strong", "subject", m.subject)); }
        li.appendChild(ui.block("div", "text", m.text));
        (m.attachments || []).forEach(function (a) {
          li.appendChild(ui.line("div", "attachment", ["Attachment: ", ui.fileName(a.filename || "attachment")]));
        });
        list.appendChild(li);
      });
    }).catch(function (e) { setStatus(e.message); });
  }

  // -- KPIs ------------------------------------------------------------------------------
  function addRating(frame) {
    var li = el("li", "rating", "#" + frame.conversation_id + " · " + (frame.scale || "csat") + " " + frame.score + (frame.queue ? " · " + frame.queue : ""));
    $("ratings").insertBefore(li, $("ratings").firstChild);
  }
  function bars(svg, rows, label, value, max) {
    svg.replaceChildren();
    var width = svg.clientWidth || 360, rowHeight = 18;
    svg.setAttribute("viewBox", "0 0 " + width + " " + Math.max(rowHeight, rows.length * rowHeight));
    rows.forEach(function (row, i) {
      var v = value(row) || 0, w = max ? Math.max(1, (width - 140) * v / max) : 0;
      var text = document.createElementNS(SVG, "text");
      text.setAttribute("x", "0"); text.setAttribute("y", String(i * rowHeight + 13));
      text.textContent = label(row) + " " + (Math.round(v * 10) / 10);
      var rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", "130"); rect.setAttribute("y", String(i * rowHeight + 3));
      rect.setAttribute("width", String(w)); rect.setAttribute("height", "12");
      svg.appendChild(text); svg.appendChild(rect);
    });
  }
  function loadCharts() {
    // the last 24 hours by the server's clock (the report's default period)
    api("GET", "/api/reports/kpis?by=queue").then(function (report) {
      var rows = report.rows.filter(function (r) { return r.first_response_seconds.count; });
      var max = Math.max.apply(null, [1].concat(rows.map(function (r) { return r.first_response_seconds.avg; })));
      bars($("frt-chart"), rows, function (r) { return r.queue; }, function (r) { return r.first_response_seconds.avg; }, max);
    }).catch(function () {});
    api("GET", "/api/reports/kpis?by=agent").then(function (report) {
      var rows = report.rows.filter(function (r) { return r.csat.count; });
      bars($("csat-chart"), rows, function (r) { return r.agent; }, function (r) { return r.csat.avg; }, 5);
    }).catch(function () {});
  }

  $("logout").addEventListener("click", function () {
    api("POST", "/console/logout", {}).finally(function () { location.assign("/console/login"); });
  });
  window.omrConsole.signedIn().then(function (data) {
    if (!data) { return; }

    $("me").textContent = data.user.name + " (" + data.user.role + ")";
    connect(); loadCharts();
    setInterval(loadCharts, 30000);
  });
})();
