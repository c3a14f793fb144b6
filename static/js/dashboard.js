// The live dashboard: machine cards updated from /ws/dashboard/, connect, and the session card.
// Plain JavaScript, no build step. The server renders the machine cards; this script keeps them
// live, and resyncs them from /dashboard/machines/ whenever the socket (re)opens, because pushed
// messages may be lost (the database is the truth).
(function () {
  "use strict";

  // Every sentence comes from the server (dashboard/cards.py, page_texts), defined once there.
  var TEXTS = JSON.parse(document.getElementById("page-texts").textContent);
  var STATUS_TEXT = TEXTS.status;
  var STATE_LABEL = TEXTS.state_labels;
  var STATE_SUMMARY = TEXTS.state_summaries;
  var LIVE_STATES = TEXTS.live_states;
  var GIB = 1024 * 1024 * 1024;

  var machinesBox = document.getElementById("machines");
  var slot = document.getElementById("session-slot");
  var sessionEmpty = document.getElementById("session-empty");
  var liveStatus = document.getElementById("live-status");
  var announcer = document.getElementById("announcer");

  var current = null;        // the session shown in the card (API shape)
  var seenEvents = 0;        // events already rendered for ``current``
  var eventsLoaded = false;  // the first load of them done: later warnings are news
  var card = null;           // the session card element

  // --- small helpers ----------------------------------------------------------------------

  function cookie(name) {
    var match = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
    return match ? decodeURIComponent(match[1]) : "";
  }

  function api(method, url, body) {
    var opts = {
      method: method,
      credentials: "same-origin",
      headers: { "Accept": "application/json", "X-CSRFToken": cookie("csrftoken") }
    };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    return fetch(url, opts).then(function (r) {
      if (r.status === 401) { goToLogin(); }
      return r.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
        if (!r.ok) {
          var err = new Error((data && data.detail) || ("The server answered " + r.status + "."));
          err.status = r.status;
          throw err;
        }
        return data;
      });
    });
  }

  function goToLogin() {
    window.location.href = "/accounts/login/?next=" + encodeURIComponent(window.location.pathname);
  }

  function announce(text) {
    announcer.textContent = "";
    window.setTimeout(function () { announcer.textContent = text; }, 50);
  }

  var notice = document.getElementById("notice");
  var noticeText = document.getElementById("notice-text");
  function showNotice(text, kind) {
    noticeText.textContent = text;
    notice.dataset.kind = kind || "error";
    notice.hidden = false;
  }
  function hideNotice() { notice.hidden = true; noticeText.textContent = ""; }
  document.getElementById("notice-close").addEventListener("click", hideNotice);

  function connectError(err) {
    if (err.status === 409 && /^(no machine in|there is no machine in)/.test(err.message)) {
      // No machine the student may use could ever take this: waiting would not help.
      return "No machine can take this request: " + err.message + ". Ask for less, or ask staff.";
    }
    if (err.status === 409) {
      return "No machine fits right now: " + err.message + ". Try another machine, fewer requirements, or again in a few minutes.";
    }
    if (err.status === 403) {
      return "Not allowed: " + err.message + ".";
    }
    if (err.status === 400) {
      return "That request was not valid: " + err.message;
    }
    return "Could not connect: " + err.message;
  }

  // In the student's zone (the profile's, else the browser's): static/js/localtime.js.
  function fmtTime(iso) { return window.NexTime.time(iso); }

  // Mirrors nexcompute/words.py's plural: "1 process", "2 processes".
  function plural(n, word, many) { return n + " " + (n === 1 ? word : (many || word + "s")); }

  function fmtLeft(ms) {
    if (ms <= 0) { return "0:00"; }
    var s = Math.floor(ms / 1000);
    var h = Math.floor(s / 3600);
    var m = Math.floor((s % 3600) / 60);
    var sec = s % 60;
    var mm = (h ? String(m).padStart(2, "0") : String(m));
    return (h ? h + ":" : "") + mm + ":" + String(sec).padStart(2, "0");
  }

  // --- machine cards ----------------------------------------------------------------------

  function labOpen(el) {
    var lab = el.closest(".lab");
    return !lab || lab.dataset.open !== "0";
  }

  function mySessionMachine() {
    return current && LIVE_STATES.indexOf(current.state) >= 0 ? current.machine.id : null;
  }

  function paintCard(el) {
    var status = el.dataset.status;
    var mine = String(mySessionMachine()) === el.dataset.machineId;
    var open = labOpen(el);
    var text = mine ? STATUS_TEXT.mine
      : (status === "available" && !open) ? STATUS_TEXT.closed
      : (STATUS_TEXT[status] || [status, ""]);
    var usable = status === "available" && open;
    var badge = el.querySelector('[data-field="label"]');
    badge.textContent = text[0];
    badge.className = "badge status-" + status + (mine ? " mine" : "");
    var reason = el.querySelector('[data-field="reason"]');
    reason.textContent = text[1];
    reason.hidden = !text[1];
    el.dataset.usable = usable ? "1" : "0";
    var warm = el.querySelector('[data-field="warm"]');
    if (warm) { warm.hidden = !(usable && el.dataset.warm === "1"); }
    var button = el.querySelector('[data-action="connect"]');
    if (button && !button.dataset.busy) { button.disabled = !usable; }
  }

  function setBar(el, key, value) {
    var row = el.querySelector('[data-metric="' + key + '"]');
    if (!row) { return; }
    var bar = row.querySelector(".bar");
    var fill = row.querySelector(".bar-fill");
    var label = row.querySelector(".bar-value");
    if (typeof value !== "number") {
      bar.removeAttribute("aria-valuenow");
      fill.style.width = "0%";
      label.textContent = "–";
      return;
    }
    var v = Math.max(0, Math.min(100, Math.round(value)));
    bar.setAttribute("aria-valuenow", String(v));
    fill.style.width = v + "%";
    fill.classList.toggle("high", v >= 85);
    label.textContent = v + "%";
  }

  function machineEl(id) {
    return machinesBox.querySelector('[data-machine-id="' + id + '"]');
  }

  function applyMachine(m, speak) {
    var el = machineEl(m.id);
    if (!el) { return false; }
    if (m.status && m.status !== el.dataset.status) {
      // An agent saying hello may bring new specs, one going away leaves its last-seen time:
      // fetch the cards again.
      if (el.dataset.status === "offline" || m.status === "offline") { scheduleResync(); }
      var load = el.querySelector('[data-field="load"]');
      var seen = el.querySelector('[data-field="last-seen"]');
      if (load) { load.hidden = m.status === "offline"; }
      if (seen) { seen.hidden = m.status !== "offline"; }
      el.dataset.status = m.status;
      paintCard(el);
      if (speak && !el.hidden) {
        announce(el.querySelector(".machine-name").textContent + ": " + el.querySelector('[data-field="label"]').textContent);
      }
    }
    if (typeof m.warm_ready === "boolean" && (m.warm_ready ? "1" : "0") !== el.dataset.warm) {
      el.dataset.warm = m.warm_ready ? "1" : "0";
      paintCard(el);
    }
    if (m.status === "offline") {
      setBar(el, "cpu_percent", null); setBar(el, "memory_percent", null); setBar(el, "gpu_percent", null);
    } else if (m.metrics) {
      setBar(el, "cpu_percent", m.metrics.cpu_percent);
      setBar(el, "memory_percent", m.metrics.memory_percent);
      setBar(el, "gpu_percent", m.metrics.gpu_percent);
    }
    return true;
  }

  function paintAll() {
    machinesBox.querySelectorAll(".machine").forEach(paintCard);
    applyFilters();
    paintConnectAny();
  }

  // --- resync -----------------------------------------------------------------------------

  var resyncTimer = null;
  function scheduleResync(delay) {
    if (resyncTimer) { return; }
    resyncTimer = window.setTimeout(function () { resyncTimer = null; resync(); }, delay || 250);
  }

  function resync() {
    var focusedId = null;
    var active = document.activeElement;
    if (active && machinesBox.contains(active)) {
      var holder = active.closest("[data-machine-id]");
      focusedId = holder ? holder.dataset.machineId : null;
    }
    fetch("/dashboard/machines/", { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.redirected && r.url.indexOf("/accounts/login/") >= 0) { goToLogin(); return null; }
        if (!r.ok) { throw new Error("resync failed: " + r.status); }
        return r.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        machinesBox.innerHTML = html;
        window.NexTime.rewrite(machinesBox);
        refreshLabOptions();
        paintAll();
        if (focusedId) {
          var again = machineEl(focusedId);
          var button = again && again.querySelector('[data-action="connect"]');
          if (button) { button.focus(); }
        }
      })
      .catch(function () { /* the next push or reconnect tries again */ });
    if (current) { refreshSession(current.id); } else { loadLatestSession(); }
  }

  function refreshLabOptions() {
    var select = document.getElementById("filter-lab");
    var have = {};
    for (var i = 0; i < select.options.length; i++) { have[select.options[i].value] = true; }
    machinesBox.querySelectorAll(".lab").forEach(function (lab) {
      if (!have[lab.dataset.lab]) {
        var opt = document.createElement("option");
        opt.value = lab.dataset.lab;
        opt.textContent = lab.dataset.lab;
        select.appendChild(opt);
      }
    });
  }

  // A lab closing while the page is open: its free machines stop being usable.
  window.setInterval(function () {
    var changed = false;
    machinesBox.querySelectorAll(".lab[data-open-until]").forEach(function (lab) {
      if (lab.dataset.open === "1" && Date.parse(lab.dataset.openUntil) <= Date.now()) {
        lab.dataset.open = "0";
        var hours = lab.querySelector('[data-field="hours"]');
        hours.textContent = "Closed now (outside the lab's hours)";
        hours.classList.add("closed");
        changed = true;
      }
    });
    if (changed) { paintAll(); }
  }, 15000);
  // A slow backstop for anything the pushes missed (labs opening, lost messages).
  window.setInterval(function () { scheduleResync(0); }, 120000);

  // --- filters ----------------------------------------------------------------------------

  var filters = document.getElementById("filters");
  function applyFilters() {
    var gpu = document.getElementById("filter-gpu").checked;
    var free = document.getElementById("filter-free").checked;
    var minGb = Number(document.getElementById("filter-memory").value) || 0;
    var lab = document.getElementById("filter-lab").value;
    var shown = 0;
    var total = 0;
    machinesBox.querySelectorAll(".lab").forEach(function (section) {
      var inLab = 0;
      section.querySelectorAll(".machine").forEach(function (el) {
        total += 1;
        var ok = (!gpu || el.dataset.gpu === "1")
          && (!free || el.dataset.usable === "1")
          && Number(el.dataset.memoryBytes) >= minGb * GIB * 0.97 // "16 GB" machines report a bit less
          && (!lab || el.dataset.lab === lab);
        el.hidden = !ok;
        if (ok) { inLab += 1; }
      });
      section.hidden = inLab === 0;
      shown += inLab;
    });
    document.getElementById("filter-empty").hidden = !(total > 0 && shown === 0);
    var count = document.getElementById("machine-count");
    var words = total + " machine" + (total === 1 ? "" : "s");
    count.textContent = shown === total ? words : shown + " of " + words + " shown";
  }
  filters.addEventListener("change", applyFilters);
  filters.addEventListener("submit", function (e) { e.preventDefault(); });
  document.getElementById("filter-reset").addEventListener("click", function () {
    filters.reset();
    applyFilters();
    document.getElementById("filter-gpu").focus();
  });

  // --- connect ----------------------------------------------------------------------------

  function startSession(body, button) {
    hideNotice();
    if (button) { button.disabled = true; button.dataset.busy = "1"; button.setAttribute("aria-busy", "true"); }
    return api("POST", "/api/sessions", body)
      .then(function (session) {
        showSession(session, true);
        announce("Connecting to " + session.machine.name + ".");
      })
      .catch(function (err) { showNotice(connectError(err)); })
      .then(function () {
        if (button) {
          delete button.dataset.busy;
          button.removeAttribute("aria-busy");
          var el = button.closest(".machine");
          if (el) { paintCard(el); } else { button.disabled = false; paintConnectAny(); }
        }
      });
  }

  machinesBox.addEventListener("click", function (e) {
    var button = e.target.closest('[data-action="connect"]');
    if (!button || button.disabled) { return; }
    var el = button.closest(".machine");
    startSession({ machine_id: Number(el.dataset.machineId) }, button);
  });

  document.getElementById("connect-any").addEventListener("submit", function (e) {
    e.preventDefault();
    var form = e.target;
    var memory = form.elements.min_memory_gb.value.trim();
    var requirements = { gpu: form.elements.gpu.checked };
    if (memory) {
      var n = Number(memory);
      if (!isFinite(n) || n < 0) {
        showNotice("Minimum memory must be a number of GB, 0 or more.");
        form.elements.min_memory_gb.focus();
        return;
      }
      requirements.min_memory_gb = n;
    }
    startSession({ requirements: requirements }, form.querySelector('button[type="submit"]'));
  });

  // --- the session card -------------------------------------------------------------------

  function part(name) { return card.querySelector('[data-s="' + name + '"]'); }

  function buildCard() {
    var tpl = document.getElementById("session-template");
    var node = tpl.content.firstElementChild.cloneNode(true);
    slot.appendChild(node);
    card = node;
    part("extend").addEventListener("click", onExtend);
    part("end").addEventListener("click", function () {
      part("confirm").hidden = false;
      part("confirm-yes").focus();
    });
    part("confirm-no").addEventListener("click", function () {
      part("confirm").hidden = true;
      part("end").focus();
    });
    part("confirm-yes").addEventListener("click", onEnd);
    part("dismiss").addEventListener("click", dismissSession);
  }

  function showSession(session, focus) {
    if (!card || !current || current.id !== session.id) {
      if (card) { card.remove(); }
      buildCard();
      seenEvents = 0;
      eventsLoaded = false;
      part("events").innerHTML = "";
      part("warnings").innerHTML = "";
    }
    current = session;
    sessionEmpty.hidden = true;
    renderSession();
    paintAll();
    refreshEvents(session.id);
    if (focus) {
      card.scrollIntoView({ block: "nearest" });
      card.focus();
    }
  }

  function dismissSession() {
    if (card) { card.remove(); }
    card = null;
    current = null;
    sessionEmpty.hidden = false;
    paintAll();
  }

  function renderSession() {
    var s = current;
    var live = LIVE_STATES.indexOf(s.state) >= 0;
    card.dataset.sessionId = String(s.id);
    card.dataset.state = s.state;
    part("machine").textContent = s.machine.name;
    var badge = part("state-label");
    badge.textContent = STATE_LABEL[s.state] || s.state;
    badge.className = "badge state-" + s.state;
    part("summary").textContent = STATE_SUMMARY[s.state] || "";
    part("progress").hidden = !(s.state === "requested" || s.state === "starting");
    var running = s.state === "running";
    var open = part("open");
    // Through the Nexus's door (/sessions/<id>/open/): it checks the session is ours and
    // running, and hands Jupyter a one-time code in a POST body. No token in any URL here.
    var door = running ? "/sessions/" + encodeURIComponent(String(s.id)) + "/open/" : null;
    if (door) {
      open.href = door;
      open.hidden = false;
      // The workspace as one zip, served by Jupyter itself (jupyter-archive in the session
      // environment), behind the same door.
      part("download-link").href = door + "?next=" + encodeURIComponent(
        "/directories/?archiveFormat=zip&archiveToken=" + Date.now());
    } else {
      open.hidden = true;
      open.removeAttribute("href");
    }
    part("download").hidden = !door;
    part("extend").hidden = !running;
    part("end").hidden = !live || s.state === "stopping";
    if (!live || s.state === "stopping") { part("confirm").hidden = true; }
    part("time-left-row").hidden = !running;
    part("idle-rule").hidden = !running;
    part("until").textContent = running ? "(until " + fmtTime(s.expires_at) + ")" : "";
    tick();
    var ended = part("ended");
    ended.hidden = live;
    if (!live) {
      part("end-reason").textContent = s.end_reason_text || STATE_SUMMARY[s.state];
      var c = s.cleanup;
      part("receipt").textContent = c
        ? (c.verified ? "Wipe verified: " : "Wipe NOT verified (staff will check): ")
          + plural(c.files_removed || 0, "file") + " removed, "
          + plural(c.processes_killed || 0, "process", "processes") + " killed."
        : "Waiting for the machine's wipe receipt…";
    }
  }

  function tick() {
    if (!card || !current || current.state !== "running") { return; }
    var left = Date.parse(current.expires_at) - Date.now();
    var el = part("time-left");
    el.textContent = fmtLeft(left);
    el.classList.toggle("low", left < 10 * 60 * 1000);
  }
  window.setInterval(tick, 1000);

  function renderEvents(events) {
    var list = part("events");
    var warnings = part("warnings");
    for (var i = seenEvents; i < events.length; i++) {
      var e = events[i];
      // One line per step: a line saying what the one before said is left out (as the
      // history page's plain_timeline does).
      if (i > 0 && events[i - 1].message === e.message) { continue; }
      if (e.kind === "warning" && eventsLoaded) {
        notify(current, "warning-" + i, "Your session on " + current.machine.name + " ends soon", e.message);
      }
      var li = document.createElement("li");
      li.className = "event kind-" + e.kind;
      var time = document.createElement("time");
      time.dateTime = e.at;
      time.textContent = fmtTime(e.at);
      li.appendChild(time);
      li.appendChild(document.createTextNode(" "));
      if (e.kind === "state" && e.state) {
        var tag = document.createElement("span");
        tag.className = "state-tag";
        tag.textContent = STATE_LABEL[e.state] || e.state;
        li.appendChild(tag);
        li.appendChild(document.createTextNode(" "));
      }
      li.appendChild(document.createTextNode(e.message));
      list.appendChild(li);
      if (e.kind === "warning") {
        var w = document.createElement("li");
        w.className = "warning";
        w.setAttribute("role", "alert");
        w.textContent = e.message;
        if (current && current.state === "running") {
          // Keep your work before the end: the workspace as a zip, through the door.
          var dl = document.createElement("a");
          dl.setAttribute("data-download-workspace", "");
          dl.href = "/sessions/" + encodeURIComponent(String(current.id)) + "/open/?next=" +
            encodeURIComponent("/nexcompute/api/download");
          dl.target = "_blank";
          dl.rel = "noopener";
          dl.textContent = "Download your workspace (.zip)";
          w.appendChild(document.createTextNode(" "));
          w.appendChild(dl);
        }
        warnings.insertBefore(w, warnings.firstChild);
      }
    }
    seenEvents = events.length;
    eventsLoaded = true;
  }

  function refreshEvents(id) {
    return api("GET", "/api/sessions/" + id + "/events").then(function (events) {
      if (current && current.id === id) { renderEvents(events || []); }
    }).catch(function () {});
  }

  function refreshSession(id) {
    return api("GET", "/api/sessions/" + id).then(function (session) {
      if (!current || current.id !== id) { return; }
      var before = current.state;
      current = session;
      renderSession();
      if (before !== session.state) {
        paintAll();
        announce("Session " + (STATE_LABEL[session.state] || session.state).toLowerCase() + ".");
        notifyState(session);
      }
      return refreshEvents(id);
    }).catch(function (err) {
      if (err.status === 404) { dismissSession(); }
    });
  }

  function loadSession(id) {
    return api("GET", "/api/sessions/" + id).then(function (session) {
      if (!current || LIVE_STATES.indexOf(current.state) < 0 || current.id === id) {
        showSession(session, false);
      }
    }).catch(function () {});
  }

  function loadLatestSession() {
    api("GET", "/api/sessions").then(function (sessions) {
      var live = (sessions || []).filter(function (s) { return LIVE_STATES.indexOf(s.state) >= 0; });
      if (live.length && !current) { showSession(live[0], false); }
    }).catch(function () {});
  }

  function onExtend() {
    var button = part("extend");
    button.disabled = true;
    api("POST", "/api/sessions/" + current.id + "/extend", { minutes: 30 })
      .then(function (session) {
        current = session;
        renderSession();
        refreshEvents(session.id);
        var text = "Extended by 30 min, now until " + fmtTime(session.expires_at) + ".";
        showNotice(text, "ok");
        announce(text);
      })
      .catch(function (err) { showNotice("Could not extend: " + err.message); })
      .then(function () { button.disabled = false; });
  }

  function onEnd() {
    var button = part("confirm-yes");
    button.disabled = true;
    api("DELETE", "/api/sessions/" + current.id)
      .then(function (session) {
        current = session;
        renderSession();
        refreshEvents(session.id);
        announce("Ending the session.");
        card.focus();
      })
      .catch(function (err) {
        showNotice("Could not end the session: " + err.message);
        if (err.status === 409) { refreshSession(current.id); }
      })
      .then(function () { button.disabled = false; });
  }

  // --- browser notifications (opt-in) ---------------------------------------------------
  // Off until the student turns them on with the button; the browser's permission is asked
  // for on that click only. The choice is kept per browser (localStorage). Driven by the same
  // live pushes as the card: ready, each warning ("ends soon"), ended with the wipe receipt.

  var NOTIFY_KEY = "nexcompute.notifications";
  var notifyBox = document.getElementById("notify");
  var notifyButton = document.getElementById("notify-toggle");
  var notifyText = document.getElementById("notify-text");
  var notifyHelp = notifyText.innerHTML;
  var supported = "Notification" in window;

  function notifyOn() {
    return supported && Notification.permission === "granted"
      && window.localStorage.getItem(NOTIFY_KEY) === "on";
  }

  function paintNotify(message) {
    var on = notifyOn();
    notifyBox.dataset.notify = on ? "on" : "off";
    notifyButton.setAttribute("aria-pressed", on ? "true" : "false");
    notifyButton.textContent = on ? "Turn off browser notifications" : "Turn on browser notifications";
    if (!supported) {
      notifyButton.disabled = true;
      notifyText.textContent = "This browser cannot show notifications.";
    } else if (Notification.permission === "denied") {
      notifyText.textContent = "Your browser blocks notifications from this site: allow them in its site settings, then press the button again.";
    } else if (message) {
      notifyText.textContent = message;
    } else {
      notifyText.innerHTML = notifyHelp;
    }
  }

  notifyButton.addEventListener("click", function () {
    if (notifyOn()) {
      window.localStorage.setItem(NOTIFY_KEY, "off");
      paintNotify("Browser notifications are off.");
      return;
    }
    var ask = Notification.permission === "granted"
      ? Promise.resolve("granted") : Promise.resolve(Notification.requestPermission());
    ask.then(function (permission) {
      if (permission === "granted") {
        window.localStorage.setItem(NOTIFY_KEY, "on");
        paintNotify("Browser notifications are on: you hear from us when your session is ready, about to end, and ended.");
      } else {
        paintNotify();
      }
    });
  });

  function notify(session, what, title, body) {
    if (!notifyOn() || !session) { return; }
    try {
      // One notification per session and event, even with the dashboard open in two tabs.
      var n = new Notification(title, { body: body, tag: "nexcompute-" + session.id + "-" + what });
      n.onclick = function () { window.focus(); n.close(); };
    } catch (e) { /* some browsers allow them only from a service worker: the card still shows it */ }
  }

  function notifyState(s) {
    var name = s.machine.name;
    if (s.state === "running") {
      notify(s, "ready", "Your session on " + name + " is ready", "Jupyter Lab is running. Open it from the dashboard.");
    } else if (s.state === "ended" || s.state === "failed") {
      var c = s.cleanup;
      var receipt = c
        ? (c.verified ? "Wipe verified: " : "Wipe NOT verified: ")
          + plural(c.files_removed || 0, "file") + " removed, "
          + plural(c.processes_killed || 0, "process", "processes") + " killed."
        : "";
      notify(s, "ended", "Your session on " + name + (s.state === "failed" ? " could not start" : " has ended"),
        ((s.end_reason_text || "") + " " + receipt).trim());
    }
  }

  // --- "Connect to any machine": off while the student holds all the sessions allowed ------

  var anyForm = document.getElementById("connect-any");
  var anyButton = anyForm.querySelector('button[type="submit"]');
  var anyLimit = document.getElementById("connect-any-limit");
  var maxSessions = Number(anyForm.dataset.maxSessions) || 1;
  var initialSession = JSON.parse(document.getElementById("initial-session").textContent);
  // Live sessions other than the one in the card (a policy may allow several).
  var otherLive = Math.max(0, (Number(anyForm.dataset.liveCount) || 0)
    - (initialSession && LIVE_STATES.indexOf(initialSession.state) >= 0 ? 1 : 0));

  function paintConnectAny() {
    if (!anyButton) { return; }  // called before this part of the script ran
    var mine = current && LIVE_STATES.indexOf(current.state) >= 0 ? 1 : 0;
    var full = otherLive + mine >= maxSessions;
    if (!anyButton.dataset.busy) { anyButton.disabled = full; }
    anyLimit.hidden = !full;
  }

  // --- the socket -------------------------------------------------------------------------

  var attempts = 0;
  function setLive(state, text) {
    liveStatus.dataset.live = state;
    liveStatus.querySelector('[data-field="text"]').textContent = text;
  }

  function openSocket() {
    var proto = window.location.protocol === "https:" ? "wss://" : "ws://";
    var ws = new WebSocket(proto + window.location.host + "/ws/dashboard/");
    ws.onopen = function () {
      attempts = 0;
      setLive("on", "Live");
      resync();  // whatever changed while we were away
    };
    ws.onmessage = function (e) {
      var msg;
      try { msg = JSON.parse(e.data); } catch (err) { return; }
      if (msg.type === "machines") {
        var unknown = false;
        var list = msg.machines || [];
        // Spoken only when one machine changed: a screen reader must not read out a fleet.
        var speak = list.filter(function (m) { return m.status; }).length === 1;
        list.forEach(function (m) { if (!applyMachine(m, speak)) { unknown = true; } });
        if (unknown) { scheduleResync(); }
        if (document.getElementById("filter-free").checked) { applyFilters(); }
      } else if (msg.type === "session") {
        if (current && current.id === msg.session_id) { refreshSession(msg.session_id); }
        else { loadSession(msg.session_id); }
      }
    };
    ws.onclose = function () {
      attempts += 1;
      // Exponential backoff with jitter, capped: a restarting server is not stampeded.
      var delay = Math.min(15000, 500 * Math.pow(2, attempts - 1)) * (0.5 + Math.random() / 2);
      setLive("off", "Reconnecting to live updates…");
      if (attempts % 3 === 0) {
        api("GET", "/api/sessions").catch(function () {});  // 401 -> back to the login page
      }
      window.setTimeout(openSocket, delay);
    };
  }

  // --- start ------------------------------------------------------------------------------

  paintNotify();
  if (initialSession) { showSession(initialSession, false); }
  paintAll();
  openSocket();
})();
