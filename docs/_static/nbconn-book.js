// nbconn book: small things the static pages need on a phone and in dark mode (no network, no framework).
(function () {
  "use strict";
  // 1. A figure opens full size when tapped: on a phone the column shows it at a readable width inside a
  //    scroller, and the whole picture is one tap away.
  function linkFigures() {
    document.querySelectorAll(".cell_output img").forEach(function (img) {
      if (img.closest("a")) return;
      var hint = document.createElement("div");
      hint.className = "nbconn-scroll-hint";
      hint.textContent = "\u2194 wider than the screen: scroll it sideways, or tap it to open it full size";
      var show = function () {
        img.style.setProperty("--nbconn-natural-width", img.naturalWidth + "px");
        // the hint only where the figure does not fit its column (CSS shows it on a narrow screen only)
        var column = link.parentNode;
        if (column && img.naturalWidth > column.clientWidth + 8) hint.classList.add("nbconn-wide");
      };
      var link = document.createElement("a");
      link.href = img.getAttribute("src");
      link.className = "nbconn-figure";
      link.title = "open the figure full size";
      img.parentNode.insertBefore(link, img);
      link.appendChild(img);
      link.parentNode.insertBefore(hint, link);  // above: a tall figure's right edge is cut off from its top
      if (img.complete) show(); else img.addEventListener("load", show);
    });
  }
  // 2. Mermaid follows the theme: when the reader switches light/dark, each diagram is drawn again from its
  //    source (kept before the first drawing replaced it with an SVG).
  function keepMermaidSources() {
    document.querySelectorAll("pre.mermaid").forEach(function (pre) {
      if (!pre.dataset.nbconnSource) pre.dataset.nbconnSource = pre.textContent;
    });
  }
  var drawnDark = null;  // the theme the diagrams were last drawn in
  function redrawMermaid() {
    if (!window.mermaid) return;
    var dark = document.documentElement.dataset.theme === "dark";
    // The theme script re-announces the same theme while the page settles: redraw only on a real change, never
    // while the first drawing may still run.
    if (dark === drawnDark) return;
    drawnDark = dark;
    window.mermaid.initialize({startOnLoad: false, theme: dark ? "dark" : "default", securityLevel: "strict"});
    var pres = document.querySelectorAll("pre.mermaid");
    var kept = Array.prototype.filter.call(pres, function (pre) { return !!pre.dataset.nbconnSource; });
    if (!kept.length) return;
    kept.forEach(function (pre) {
      pre.removeAttribute("data-processed");
      pre.textContent = pre.dataset.nbconnSource;
    });
    window.mermaid.run({nodes: kept}).catch(function (err) { console.error("mermaid:", err); });
  }
  // Sources are kept once the document is parsed, before the load event where Mermaid first draws; the theme
  // is watched only after that first drawing (the theme sets data-theme itself while the page loads).
  document.addEventListener("DOMContentLoaded", function () { keepMermaidSources(); linkFigures(); });
  window.addEventListener("load", function () {
    drawnDark = document.documentElement.dataset.theme === "dark";  // what the first drawing (at load) uses
    setTimeout(function () {
      new MutationObserver(function (changes) {
        if (changes.some(function (c) { return c.attributeName === "data-theme"; })) redrawMermaid();
      }).observe(document.documentElement, {attributes: true, attributeFilter: ["data-theme"]});
    }, 0);
  });
})();
