/* Shared by the agent console and the supervisor dashboard: element building (text only,
 * never HTML) and the REST client (the session cookie, plus the CSRF header on changes).
 *
 * Customer-controlled text (names, addresses, subjects, file names, messages) is shown
 * bidi-isolated (<bdi>, or dir="auto" on blocks): a right-to-left name or a stray override
 * stays inside its own element and cannot reorder the text around it. File names also show
 * their bidi controls as visible marks, so "invoice\u202Egnp.exe" reads
 * "invoice[U+202E]gnp.exe", never "invoiceexe.png" (docs/security.md). */
(function () {
  "use strict";
  var session = null;
  // embeddings, overrides, isolates and their terminators, and the invisible marks
  var BIDI_CONTROLS = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  /* Customer text as an isolated inline element. */
  function bdi(text, cls) { return el("bdi", cls, text); }
  /* A block of customer text: its direction from its own content, isolated. */
  function block(tag, cls, text) { var e = el(tag, cls, text); e.dir = "auto"; return e; }
  /* Bidi controls written out visibly: "[U+202E]". */
  function showControls(text) {
    return String(text).replace(BIDI_CONTROLS, function (c) {
      return "[U+" + ("000" + c.charCodeAt(0).toString(16).toUpperCase()).slice(-4) + "]";
    });
  }
  /* A file name: isolated, its bidi controls visible. */
  function fileName(name, cls) { return bdi(showControls(name), (cls ? cls + " " : "") + "filename"); }
  /* Customer text inside plain text (an <option>, a status line): isolated with FSI ... PDI,
   * its own controls shown, so it cannot close the isolate early. */
  function isolated(text) { return "\u2068" + showControls(text) + "\u2069"; }
  /* An element holding a mix of our own text (strings) and nodes (isolated customer text). */
  function line(tag, cls, parts) {
    var e = el(tag, cls);
    parts.forEach(function (part) {
      e.appendChild(typeof part === "string" ? document.createTextNode(part) : part);
    });
    return e;
  }
  function api(method, path, body) {
    var headers = {"Accept": "application/json"};
    if (method !== "GET" && session) { headers["Content-Type"] = "application/json"; headers[session.csrf_header] = session.csrf; }
    return fetch(path, {method: method, headers: headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body)})
      .then(function (response) {
        if (response.status === 401) { location.assign("/console/login"); throw new Error("signed out"); }
        return response.json().then(function (data) {
          if (!response.ok) { throw new Error(data.message || response.statusText); }
          return data;
        });
      });
  }
  /* A file for a reply: POST /api/uploads; resolves to {blob_key, filename, ...}. */
  function upload(file) {
    var form = new FormData(); form.append("file", file);
    var headers = {"Accept": "application/json"};
    if (session) { headers[session.csrf_header] = session.csrf; }
    return fetch("/api/uploads", {method: "POST", headers: headers, credentials: "same-origin", body: form})
      .then(function (response) {
        return response.json().then(function (data) {
          if (!response.ok) { throw new Error(data.message || response.statusText); }
          return data;
        });
      });
  }
  /* The signed-in user and CSRF token, or off to the sign-in page. */
  function signedIn() {
    return fetch("/console/session", {credentials: "same-origin"}).then(function (response) {
      if (!response.ok) { location.assign("/console/login"); return null; }
      return response.json().then(function (data) { session = data; return data; });
    });
  }
  /* The socket was closed because its sign-in ended (close code 4401: revoked, token
   * rotated, password changed, signed out elsewhere, expired): show why, with a link to sign
   * in again, and stop reconnecting (the credential is dead). The sign-in page shows the
   * reason too. */
  function signedOut(reason) {
    reason = reason || "signed out";
    try { sessionStorage.setItem("omr-signed-out", reason); } catch (e) { /* private mode */ }
    var banner = document.getElementById("banner");
    var link = el("a", null, "Sign in again"); link.href = "/console/login";
    banner.replaceChildren(el("span", "signed-out-reason", reason), document.createTextNode(" · "), link);
    banner.classList.add("signed-out");
    banner.hidden = false;
  }
  window.omrConsole = {
    el: el, bdi: bdi, block: block, line: line, fileName: fileName, showControls: showControls,
    isolated: isolated, api: api, upload: upload, signedIn: signedIn, signedOut: signedOut
  };
})();
