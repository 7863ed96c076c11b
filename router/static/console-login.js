/* Sign-in for the console: POST /console/login, then the session cookie does the rest. */
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  /* Why the console was signed out (its socket said so: docs/console.md), shown once. */
  try {
    var why = sessionStorage.getItem("omr-signed-out");
    if (why) { sessionStorage.removeItem("omr-signed-out"); $("login-notice").textContent = why; $("login-notice").hidden = false; }
  } catch (e) { /* private mode */ }
  function signIn(body) {
    $("login-error").hidden = true;
    fetch("/console/login", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body),
      credentials: "same-origin"
    }).then(function (response) {
      if (response.ok) { location.assign("/console"); return null; }
      return response.json().then(function (error) {
        $("login-error").textContent = error.message || "sign-in failed";
        $("login-error").hidden = false;
      });
    }).catch(function () {
      $("login-error").textContent = "the server cannot be reached";
      $("login-error").hidden = false;
    });
  }
  $("login-form").addEventListener("submit", function (event) {
    event.preventDefault();
    signIn({username: $("username").value.trim(), password: $("password").value});
  });
  $("token-form").addEventListener("submit", function (event) {
    event.preventDefault();
    signIn({token: $("token").value.trim()});
  });
})();
