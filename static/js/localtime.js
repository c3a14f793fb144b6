// Times in the student's own zone on every page: the profile's zone if one is set
// (<body data-time-zone>), else the browser's. The server writes each <time data-local> with
// its zone named; this rewrites it in the reader's zone ("time": 13:02, "datetime": date and
// time) and puts the zone in the tooltip. dashboard.js formats its own times with NexTime too.
(function () {
  "use strict";
  var zone = document.body.dataset.timeZone || undefined;
  function valid(z) {
    try { new Intl.DateTimeFormat([], { timeZone: z }); return true; } catch (e) { return false; }
  }
  if (zone && !valid(zone)) { zone = undefined; }
  var name = zone || Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";

  function fmt(iso, opts) {
    if (!iso) { return ""; }
    var d = new Date(iso);
    if (isNaN(d.getTime())) { return ""; }
    opts.timeZone = zone;
    return d.toLocaleString([], opts);
  }
  function time(iso) { return fmt(iso, { hour: "2-digit", minute: "2-digit" }); }
  function dateTime(iso) {
    return fmt(iso, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }
  function rewrite(root) {
    (root || document).querySelectorAll("time[data-local]").forEach(function (el) {
      var iso = el.getAttribute("datetime");
      var text = el.dataset.local === "time" ? time(iso) : dateTime(iso);
      if (text) { el.textContent = text; el.title = name; }
    });
  }
  window.NexTime = { zone: zone, name: name, time: time, dateTime: dateTime, rewrite: rewrite };
  rewrite(document);
})();
