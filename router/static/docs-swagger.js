/* Starts Swagger UI on /docs (router/pages.py). An external file, not an inline script: the
 * page has the console's Content-Security-Policy (script-src 'self'). The bundle and its
 * stylesheet are served from this server (the pinned fastapi-offline package), never a CDN. */
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi"),
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null,  // the public validator would be a request to another site
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset]
  });
})();
