/* Shared by the agent console and the supervisor dashboard: element building (text only,
 * never HTML) and the REST client (the session cookie, plus the CSRF header on changes). */
(function () {
  "use strict";
  var session = null;
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
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
  window.omrConsole = {el: el, api: api, upload: upload, signedIn: signedIn, signedOut: signedOut};
})();
