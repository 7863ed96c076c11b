/* Starts ReDoc on /redoc (router/pages.py). ReDoc writes its styles into <style> elements:
 * they carry the page's style nonce (style-src 'self' 'nonce-...'); scripts stay
 * script-src 'self'. Search is off: it runs in a worker made from a blob: URL, which the
 * policy does not allow. Native scrollbars: the bundle's scrollbar library injects its
 * stylesheet before any nonce can be given, so the policy refuses it (docs/security.md). */
(function () {
  "use strict";
  var root = document.getElementById("redoc");
  Redoc.init(root.getAttribute("data-openapi"), {
    nonce: root.getAttribute("data-style-nonce"),
    disableSearch: true,
    nativeScrollbars: true
  }, root);
})();
