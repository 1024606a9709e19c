// The feature index: sort by clicking a column header, or open the page with #sort=KEY (ascending) or
// #sort=-KEY (descending); rows keep their values in data-KEY attributes, empty values sort last.
// Search: rows whose feature id starts with the query, or whose explanation or tokens (data-search) hold it.
// Escape closes an enlarged heat map (a focused figure).
(function () {
  "use strict";
  var table = document.getElementById("feature-index");
  if (!table) { return; }
  var body = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.querySelectorAll("th[data-key]"));

  function value(row, key, numeric) {
    var raw = row.getAttribute("data-" + key);
    if (raw === null || raw === "") { return null; }
    if (!numeric) { return raw.toLowerCase(); }
    var x = parseFloat(raw);
    return isNaN(x) ? null : x;
  }

  function sortBy(key, descending) {
    var th = table.querySelector('th[data-key="' + key + '"]');
    if (!th) { return false; }
    var numeric = th.getAttribute("data-type") === "number";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, key, numeric), y = value(b, key, numeric);
      if (x === null && y === null) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      var c = x < y ? -1 : (x > y ? 1 : 0);
      return descending ? -c : c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    table.setAttribute("data-sorted-by", (descending ? "-" : "") + key);
    return true;
  }

  function fromHash() {
    var m = /^#sort=(-?)([\w.:-]+)$/.exec(window.location.hash);
    if (m) { sortBy(m[2], m[1] === "-"); }
  }

  headers.forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      var current = th.getAttribute("aria-sort");
      var descending = current ? current === "ascending" : th.getAttribute("data-type") === "number";
      if (sortBy(key, descending)) {
        try { history.replaceState(null, "", "#sort=" + (descending ? "-" : "") + key); } catch (e) { /* file: URLs */ }
      }
    });
  });
  window.addEventListener("hashchange", fromHash);
  fromHash();

  var search = document.getElementById("feature-search");
  var count = document.getElementById("search-count");
  function filter() {
    var q = search.value.trim().toLowerCase();
    var shown = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      var hit = q === "" || row.getAttribute("data-feature-row").indexOf(q) === 0 ||
        (row.getAttribute("data-search") || "").indexOf(q) >= 0;
      row.hidden = !hit;
      if (hit) { shown += 1; }
    });
    count.textContent = q === "" ? "" : shown + " of " + body.rows.length + " features";
  }
  if (search && count) {
    search.addEventListener("input", filter);
    filter();
  }

  document.addEventListener("keydown", function (e) {
    var el = document.activeElement;
    if (e.key === "Escape" && el && el.tagName === "FIGURE") { el.blur(); }
  });
})();
