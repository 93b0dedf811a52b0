// Pan and zoom for the report's diagrams, sortable tables, and the site picker.
// Self-contained: no library, no network.
"use strict";

(function () {
  function viewBoxOf(svg) {
    var vb = svg.viewBox && svg.viewBox.baseVal;
    if (vb && vb.width > 0 && vb.height > 0) {
      return [vb.x, vb.y, vb.width, vb.height];
    }
    var box = svg.getBBox();
    return [box.x, box.y, Math.max(box.width, 1), Math.max(box.height, 1)];
  }

  function setViewBox(svg, vb) {
    svg.setAttribute("viewBox", vb.map(function (v) { return v.toFixed(2); }).join(" "));
  }

  function toSvgPoint(svg, ctm, clientX, clientY) {
    var p = svg.createSVGPoint();
    p.x = clientX;
    p.y = clientY;
    return p.matrixTransform(ctm.inverse());
  }

  function zoomAt(svg, factor, clientX, clientY) {
    var ctm = svg.getScreenCTM();
    if (!ctm) { return; }
    var vb = viewBoxOf(svg);
    var p = toSvgPoint(svg, ctm, clientX, clientY);
    setViewBox(svg, [p.x - (p.x - vb[0]) / factor, p.y - (p.y - vb[1]) / factor,
                     vb[2] / factor, vb[3] / factor]);
  }

  function zoomCentre(svg, factor) {
    var r = svg.getBoundingClientRect();
    zoomAt(svg, factor, r.left + r.width / 2, r.top + r.height / 2);
  }

  function panZoom(viewport) {
    var svg = viewport.querySelector("svg");
    if (!svg) { return; }
    var original = viewBoxOf(svg);
    setViewBox(svg, original);
    svg.setAttribute("width", "100%");
    svg.setAttribute("height", "100%");
    svg.setAttribute("data-original-viewbox", svg.getAttribute("viewBox"));
    var drag = null;

    viewport.addEventListener("wheel", function (e) {
      e.preventDefault();
      var factor = Math.exp(-Math.max(-300, Math.min(300, e.deltaY)) * 0.0015);
      zoomAt(svg, factor, e.clientX, e.clientY);
    }, { passive: false });

    viewport.addEventListener("mousedown", function (e) {
      if (e.button !== 0) { return; }
      var ctm = svg.getScreenCTM();
      if (!ctm) { return; }
      e.preventDefault();
      drag = { ctm: ctm, start: toSvgPoint(svg, ctm, e.clientX, e.clientY), vb: viewBoxOf(svg) };
      viewport.classList.add("dragging");
    });
    window.addEventListener("mousemove", function (e) {
      if (!drag) { return; }
      var p = toSvgPoint(svg, drag.ctm, e.clientX, e.clientY);
      setViewBox(svg, [drag.vb[0] - (p.x - drag.start.x), drag.vb[1] - (p.y - drag.start.y),
                       drag.vb[2], drag.vb[3]]);
    });
    window.addEventListener("mouseup", function () {
      drag = null;
      viewport.classList.remove("dragging");
    });

    var panel = viewport.closest(".panel");
    var buttons = panel ? panel.querySelectorAll("button[data-zoom]") : [];
    Array.prototype.forEach.call(buttons, function (button) {
      button.addEventListener("click", function () {
        var what = button.getAttribute("data-zoom");
        if (what === "reset") { setViewBox(svg, original); }
        else if (what === "in") { zoomCentre(svg, 1.25); }
        else if (what === "out") { zoomCentre(svg, 0.8); }
      });
    });
  }

  function cellValue(row, index, numeric) {
    var cell = row.cells[index];
    if (!cell) { return numeric ? -Infinity : ""; }
    var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent;
    if (!numeric) { return raw.trim().toLowerCase(); }
    var n = parseFloat(raw.replace(/,/g, ""));
    return isNaN(n) ? -Infinity : n;
  }

  function sortable(table) {
    var headers = table.tHead ? table.tHead.rows[0].cells : [];
    Array.prototype.forEach.call(headers, function (th, index) {
      th.setAttribute("tabindex", "0");
      th.setAttribute("title", "sort by this column");
      function sort() {
        var numeric = th.getAttribute("data-type") === "num";
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows).map(function (row, i) {
          return { row: row, key: cellValue(row, index, numeric), i: i };
        });
        rows.sort(function (a, b) {
          var c = a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
          return (ascending ? c : -c) || a.i - b.i;
        });
        rows.forEach(function (r) { body.appendChild(r.row); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  }

  function sitePicker(select) {
    var panels = document.querySelectorAll(".site-panel");
    function show() {
      Array.prototype.forEach.call(panels, function (p) {
        p.hidden = p.getAttribute("data-index") !== select.value;
      });
    }
    select.addEventListener("change", show);
    show();
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll(".viewport"), panZoom);
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), sortable);
    var select = document.getElementById("site-select");
    if (select) { sitePicker(select); }
  });
}());
