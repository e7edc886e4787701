// netkit chat web client: plain JavaScript, no build step. Every piece of text
// from the network is inserted with textContent, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"), nickForm: $("nick-form"), nickInput: $("nick-input"),
    roomList: $("room-list"), joinForm: $("join-form"), joinInput: $("join-input"),
    title: $("room-title"), topic: $("topic"), part: $("part-button"),
    messages: $("messages"), sayForm: $("say-form"), sayInput: $("say-input"),
    members: $("member-list"), chat: $("chat"), uploads: $("uploads"),
    fileInput: $("file-input"), fileButton: $("file-button"),
    accountForm: $("account-form"), password: $("password-input"),
    register: $("register-button"), logout: $("logout-button"),
  };
  // The session token a login gave (never the password): it logs the page in again.
  const SESSION = "netkit.session";
  let refusedBeforeLogin = false;

  // rooms: name -> { lastId, since, items: [entry], members: [], topic, unread, joined }
  // since: in a cluster, origin -> highest origin_id seen (resume on any node)
  // Direct conversations are kept as rooms named "@nick".
  const rooms = new Map();
  let current = null;
  let myNick = localStorage.getItem("netkit.nick") || "";
  let ws = null;
  let backoff = 500;
  let reconnectTimer = null;
  const MAX_ITEMS = 500;
  // Server admin (--chat-admins): may moderate every room.
  let amAdmin = false;
  // Nicks whose messages this page does not show (/ignore, kept in the browser).
  const IGNORED = "netkit.ignored";
  const ignored = new Set((() => { try { return JSON.parse(localStorage.getItem(IGNORED) || "[]"); } catch { return []; } })());
  function setIgnored(nick, on) {
    const key = nick.toLowerCase();
    if (on) ignored.add(key); else ignored.delete(key);
    localStorage.setItem(IGNORED, JSON.stringify([...ignored]));
    notice(current, (on ? "ignoring " : "no longer ignoring ") + nick);
    renderMembers();
  }
  const isIgnored = (nick) => ignored.has(String(nick).toLowerCase());

  function room(name) {
    if (!rooms.has(name)) {
      rooms.set(name, { lastId: 0, since: {}, items: [], members: [], ops: [], topic: "", unread: 0, joined: false });
    }
    return rooms.get(name);
  }

  function savedRooms() {
    try { return JSON.parse(localStorage.getItem("netkit.rooms") || "{}"); } catch { return {}; }
  }
  function saveRooms() {
    const out = {};
    for (const [name, r] of rooms) if (!name.startsWith("@") && r.joined) out[name] = r.lastId;
    localStorage.setItem("netkit.rooms", JSON.stringify(out));
  }

  function clock(ts) {
    const d = new Date(ts);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function renderItem(item) {
    const li = document.createElement("li");
    li.className = item.cls;
    if (item.id) li.dataset.id = String(item.id);
    if (item.ts) {
      const t = document.createElement("time");
      t.dateTime = new Date(item.ts).toISOString();
      t.textContent = clock(item.ts);
      li.appendChild(t);
    }
    if (item.from) {
      const f = document.createElement("span");
      f.className = "from";
      f.textContent = item.cls.includes("me") ? "* " + item.from : item.from;
      li.appendChild(f);
    }
    if (item.file) {
      li.appendChild(renderFile(item.file));
      return li;
    }
    const s = document.createElement("span");
    s.className = "text";
    s.textContent = item.text;
    li.appendChild(s);
    return li;
  }

  // A byte count for people, as the server writes it (powers of 1000).
  function humanSize(n) {
    if (n < 1000) return n + " B";
    const units = ["kB", "MB", "GB", "TB", "PB"];
    let v = n / 1000, u = 0;
    while (v >= 999.95 && u < units.length - 1) { v /= 1000; u += 1; }
    return v.toFixed(1) + " " + units[u];
  }

  function fileIcon(mime) {
    if (mime.startsWith("image/")) return "🖼";
    if (mime.startsWith("video/")) return "🎞";
    if (mime.startsWith("audio/")) return "🎵";
    if (mime.startsWith("text/")) return "📝";
    if (/zip|tar|gzip|compress|7z|rar/.test(mime)) return "🗜";
    return "📄";
  }

  // A file message: icon, name as a download link, size, and the thumbnail
  // of an image. Only http(s) links.
  function renderFile(f) {
    const card = document.createElement("span");
    card.className = "file-card";
    const icon = document.createElement("span");
    icon.className = "file-icon";
    icon.setAttribute("aria-hidden", "true");
    icon.textContent = fileIcon(String(f.mime || ""));
    card.appendChild(icon);
    let href = null;
    try {
      const u = new URL(String(f.url), location.href);
      if (u.protocol === "http:" || u.protocol === "https:") href = u.href;
    } catch { href = null; }
    const name = document.createElement(href ? "a" : "span");
    name.textContent = String(f.name);
    if (href) { name.href = href; name.setAttribute("download", String(f.name)); name.rel = "noopener"; }
    card.appendChild(name);
    // The server's own small PNG of an image (never the image itself), asked
    // for on this page's origin, so the img-src 'self' policy holds wherever
    // the link's host name points.
    let thumb = null;
    try {
      if (f.thumb && !f.expired) {
        const t = new URL(String(f.thumb), location.href);
        if (t.pathname.startsWith("/thumbs/")) thumb = t.pathname;
      }
    } catch { thumb = null; }
    if (thumb) {
      const img = document.createElement("img");
      img.className = "file-thumb";
      img.src = thumb;
      img.alt = "preview of " + String(f.name);
      img.loading = "lazy";
      img.decoding = "async";
      if (href) {
        const a = document.createElement("a");
        a.href = href; a.setAttribute("download", String(f.name)); a.rel = "noopener";
        a.className = "file-thumb-link";
        a.appendChild(img);
        card.appendChild(a);
      } else {
        card.appendChild(img);
      }
    }
    const size = document.createElement("span");
    size.className = "file-size";
    size.textContent = humanSize(Number(f.size) || 0);
    card.appendChild(size);
    return card;
  }

  function add(name, item) {
    const r = room(name);
    r.items.push(item);
    if (r.items.length > MAX_ITEMS) r.items.splice(0, r.items.length - MAX_ITEMS);
    if (name === current) {
      const atBottom = el.messages.scrollHeight - el.messages.scrollTop - el.messages.clientHeight < 40;
      el.messages.appendChild(renderItem(item));
      while (el.messages.children.length > MAX_ITEMS) el.messages.firstChild.remove();
      if (atBottom || item.mine) el.messages.scrollTop = el.messages.scrollHeight;
    } else if (!item.cls.includes("notice")) {
      r.unread += 1;
      renderRooms();
    }
  }

  function notice(name, text, cls) {
    add(name || current || "", { cls: cls || "notice", text, ts: Date.now() });
  }

  function renderRooms() {
    el.roomList.replaceChildren();
    for (const [name, r] of rooms) {
      if (!r.joined && !name.startsWith("@")) continue;
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = (name.startsWith("@") ? name : "#" + name) + (r.unread ? " (" + r.unread + ")" : "");
      if (r.unread) b.className = "unread";
      b.setAttribute("aria-current", String(name === current));
      b.addEventListener("click", () => select(name));
      li.appendChild(b);
      el.roomList.appendChild(li);
    }
  }

  // Members of other cluster nodes are shown (and messaged) as nick@node.
  function atNode(nick, node) { return node ? nick + "@" + node : nick; }
  function shownMembers(members, remote) {
    const local = members.slice();
    for (const r of remote || []) {
      const i = local.indexOf(r.nick);
      if (i >= 0) local.splice(i, 1);
    }
    return local.concat((remote || []).map((r) => atNode(r.nick, r.node))).sort();
  }

  // A small button of the member list.
  function memberAction(label, title, cls, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.title = title;
    b.className = cls;
    b.addEventListener("click", onClick);
    return b;
  }

  function renderMembers() {
    el.members.replaceChildren();
    const r = current ? room(current) : null;
    if (!r) return;
    const moderator = amAdmin || r.ops.includes(myNick);
    for (const m of r.members) {
      const li = document.createElement("li");
      li.appendChild(memberAction(m, "Direct message " + m, "member-dm",
        () => { el.sayInput.value = "/msg " + m + " "; el.sayInput.focus(); }));
      if (r.ops.includes(m)) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = "op";
        li.appendChild(badge);
      }
      // Members of other nodes (nick@node) are moderated on their node.
      if (m !== myNick && !m.includes("@")) {
        const on = !isIgnored(m);
        li.appendChild(memberAction(on ? "ignore" : "unignore", (on ? "Hide" : "Show") + " messages from " + m,
          "member-ignore", () => setIgnored(m, on)));
        if (moderator) {
          li.appendChild(memberAction("kick", "Kick " + m + " from #" + current, "member-kick",
            () => send({ type: "kick", room: current, nick: m })));
          li.appendChild(memberAction("ban", "Ban " + m + " from #" + current, "member-ban",
            () => send({ type: "ban", room: current, nick: m })));
        }
      }
      el.members.appendChild(li);
    }
  }

  function select(name) {
    current = name;
    const r = room(name);
    r.unread = 0;
    el.title.textContent = name.startsWith("@") ? "Direct: " + name.slice(1) : "#" + name;
    el.topic.textContent = r.topic || "";
    el.part.hidden = name.startsWith("@");
    el.messages.replaceChildren(...r.items.map(renderItem));
    el.messages.scrollTop = el.messages.scrollHeight;
    renderRooms();
    renderMembers();
    localStorage.setItem("netkit.current", name);
  }

  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(obj));
      return true;
    }
    notice(current, "not connected; the message was not sent (reconnecting…)", "error");
    return false;
  }

  function setStatus(text, cls) {
    el.status.textContent = text;
    el.status.className = cls || "";
  }

  function onMessage(m) {
    switch (m.type) {
      case "welcome": {
        const wanted = myNick;
        myNick = m.nick;
        el.nickInput.value = m.nick;
        if (wanted && wanted !== m.nick) send({ type: "nick", nick: wanted });
        break;
      }
      case "joined": {
        const r = room(m.room);
        r.joined = true;
        r.topic = m.topic;
        r.members = shownMembers(m.members, m.remote);
        r.ops = m.ops || [];
        if (r.lastId === 0 || m.truncated) notice(m.room, "joined #" + m.room);
        else notice(m.room, "reconnected to #" + m.room);
        if (m.truncated) notice(m.room, "some older messages were skipped; scroll the history with the API");
        saveRooms();
        if (!current || current === m.room || !rooms.get(current) || !rooms.get(current).joined) select(m.room);
        else renderRooms();
        break;
      }
      case "message": {
        const r = room(m.room);
        if (m.origin) {
          // In a cluster ids are per node: what was seen is the origin vector.
          if ((r.since[m.origin] || 0) >= m.origin_id) break;
          r.since[m.origin] = m.origin_id;
        } else if (m.id <= r.lastId) break; // already seen (resume overlap)
        r.lastId = m.id;
        if (m.kind === "notice") { add(m.room, { cls: "notice moderation", id: m.id, ts: m.ts, text: m.text }); saveRooms(); break; }
        if (isIgnored(m.from)) { saveRooms(); break; }
        add(m.room, {
          cls: "msg" + (m.kind === "me" ? " me" : "") + (m.file ? " file" : ""), id: m.id, ts: m.ts,
          from: m.from, text: m.text, file: m.file, mine: m.from === myNick,
        });
        saveRooms();
        break;
      }
      case "parted": {
        const r = room(m.room);
        r.joined = false;
        saveRooms();
        if (current === m.room) {
          const next = [...rooms.entries()].find(([n, x]) => x.joined || n.startsWith("@"));
          if (next) select(next[0]); else { current = null; el.title.textContent = "No room"; el.messages.replaceChildren(); el.members.replaceChildren(); }
        }
        renderRooms();
        break;
      }
      case "presence": {
        const r = room(m.room);
        const who = atNode(m.nick, m.node);
        if (m.event === "join") { if (!r.members.includes(who)) r.members.push(who); r.members.sort(); }
        else r.members = r.members.filter((x) => x !== who);
        notice(m.room, who + (m.event === "join" ? " joined" : " left") + (m.reason ? " (" + m.reason + ")" : ""));
        if (m.room === current) renderMembers();
        break;
      }
      case "nick": {
        const oldName = atNode(m.old, m.node), newName = atNode(m.new, m.node);
        if (!m.node && m.old === myNick) {
          myNick = m.new;
          el.nickInput.value = m.new;
          localStorage.setItem("netkit.nick", m.new);
        }
        for (const [name, r] of rooms) {
          r.ops = r.ops.map((x) => (x === oldName ? newName : x));
          if (r.joined && r.members.includes(oldName)) {
            r.members = r.members.map((x) => (x === oldName ? newName : x)).sort();
            notice(name, oldName + " is now known as " + newName);
          }
        }
        if (m.old === myNick || m.new === myNick) setStatus("online as " + myNick, "online");
        renderMembers();
        break;
      }
      case "direct": {
        if (m.from !== myNick && isIgnored(m.from)) break;
        const peer = m.from === myNick ? m.to : m.from;
        add("@" + peer, { cls: "msg direct", ts: m.ts, from: m.from, text: m.text, mine: m.from === myNick });
        renderRooms();
        break;
      }
      case "topic": {
        const r = room(m.room);
        r.topic = m.topic;
        notice(m.room, m.by + " set the topic: " + m.topic);
        if (m.room === current) el.topic.textContent = m.topic;
        break;
      }
      case "modes": {
        const r = room(m.room);
        r.ops = m.ops || [];
        if (m.room === current) renderMembers();
        break;
      }
      case "members": {
        const r = room(m.room);
        r.members = shownMembers(m.members, m.remote);
        if (m.room === current) renderMembers();
        break;
      }
      case "rooms":
        notice(current, "rooms: " + (m.rooms.map((r) => "#" + r.name + " (" + r.members + ")").join(", ") || "none"));
        break;
      case "info":
        notice(current, m.text);
        break;
      case "file_ticket": {
        const waiting = ticketWaiters.get(m.room) || [];
        ticketWaiters.delete(m.room);
        for (const w of waiting) w(m.ticket);
        break;
      }
      case "logged_in": {
        if (m.session) localStorage.setItem(SESSION, m.session);
        amAdmin = !!m.admin;
        renderMembers();
        el.accountForm.hidden = true;
        el.logout.hidden = false;
        el.password.value = "";
        // Under --chat-auth required the joins sent before this were refused.
        if (refusedBeforeLogin) {
          refusedBeforeLogin = false;
          const saved = Object.entries(savedRooms());
          if (saved.length === 0) saved.push(["lobby", 0]);
          for (const [name, lastId] of saved) {
            if (!room(name).joined) send({ type: "join", room: name, after: lastId || undefined });
          }
        }
        notice(current, "logged in as " + m.nick);
        break;
      }
      case "error":
        if (m.code === "bad_token" && localStorage.getItem(SESSION)) localStorage.removeItem(SESSION);
        if (m.code === "login_required") refusedBeforeLogin = true;
        notice(current, "error: " + m.message, "error");
        break;
      default:
        break;
    }
    if (m.type === "welcome" || m.type === "nick") setStatus("online as " + myNick, "online");
  }

  function connect() {
    clearTimeout(reconnectTimer);
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const q = myNick ? "?nick=" + encodeURIComponent(myNick) : "";
    setStatus("connecting…");
    ws = new WebSocket(proto + "//" + location.host + "/ws" + q);
    ws.addEventListener("open", () => {
      backoff = 500;
      const session = localStorage.getItem(SESSION);
      if (session) send({ type: "login", session });
      // Rejoin every room, resuming after the last id seen: no gap, no duplicate.
      const saved = savedRooms();
      const want = new Map(Object.entries(saved));
      for (const [name, r] of rooms) if (r.joined) want.set(name, r.lastId);
      for (const [name] of rooms) if (!name.startsWith("@")) room(name).joined = false;
      if (want.size === 0) want.set("lobby", 0);
      for (const [name, lastId] of want) {
        const r = room(name);
        if (lastId > r.lastId) r.lastId = lastId;
        const resume = r.lastId > 0 && r.items.length > 0;
        const join = { type: "join", room: name };
        if (resume) join.after = r.lastId;
        // The vector resumes on whichever node answers; `after` is the fallback.
        if (resume && Object.keys(r.since).length > 0) join.since = r.since;
        send(join);
        if (r.items.length === 0) { r.lastId = 0; r.since = {}; }
      }
    });
    ws.addEventListener("message", (ev) => {
      let m;
      try { m = JSON.parse(ev.data); } catch { return; }
      onMessage(m);
    });
    ws.addEventListener("close", (ev) => {
      const why = ev.reason ? " (" + ev.reason + ")" : "";
      const wait = Math.round(backoff * (0.75 + Math.random() * 0.5));
      setStatus("offline" + why + " — retrying in " + Math.ceil(wait / 1000) + " s", "offline");
      if (current) notice(current, "disconnected" + why);
      reconnectTimer = setTimeout(connect, wait);
      backoff = Math.min(backoff * 2, 15000);
    });
  }

  el.sayForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = el.sayInput.value;
    if (!text.trim()) return;
    const target = current;
    let sent = false;
    const cmd = text.match(/^\/(\w+)\s*(.*)$/s);
    if (cmd && !text.startsWith("//")) {
      const [, name, rest] = cmd;
      switch (name.toLowerCase()) {
        case "me": sent = target && !target.startsWith("@") && send({ type: "me", room: target, text: rest }); break;
        case "msg": {
          const mm = rest.match(/^(\S+)\s+(.+)$/s);
          sent = mm ? send({ type: "msg", to: mm[1], text: mm[2] }) : (notice(target, "usage: /msg NICK text", "error"), false);
          break;
        }
        case "nick": sent = send({ type: "nick", nick: rest.trim() }); break;
        case "join": sent = send({ type: "join", room: rest.trim().replace(/^#/, "") }); break;
        case "part": sent = target && send({ type: "part", room: rest.trim().replace(/^#/, "") || target }); break;
        case "topic": sent = target && send({ type: "topic", room: target, topic: rest }); break;
        case "rooms": sent = send({ type: "rooms" }); break;
        case "who": sent = target && send({ type: "who", room: rest.trim().replace(/^#/, "") || target }); break;
        case "ignore": case "unignore":
          if (rest.trim()) { setIgnored(rest.trim(), name.toLowerCase() === "ignore"); sent = true; }
          break;
        case "op": case "deop": case "voice": case "devoice": case "invite": case "unban": case "unmute":
          sent = target && send({ type: name.toLowerCase(), room: target, nick: rest.trim() });
          break;
        case "kick": case "mute": case "ban": {
          const [, who, more] = rest.trim().match(/^(\S+)\s*(.*)$/s) || [];
          if (!who) { notice(target, "usage: /" + name + " NICK …", "error"); break; }
          const msg = { type: name.toLowerCase(), room: target, nick: who };
          if (name === "kick" && more) msg.reason = more;
          if (name === "mute" && more) msg.duration = more.trim();
          if (name === "ban" && more) {
            const [, d, why] = more.match(/^(\d+[smhdw]?)\s*(.*)$/s) || [];
            if (d) { msg.duration = d; if (why) msg.reason = why; } else msg.reason = more;
          }
          sent = target && send(msg);
          break;
        }
        case "mode": sent = target && send({ type: "mode", room: target, mode: rest.trim() }); break;
        case "close": sent = send({ type: "close", room: rest.trim().replace(/^#/, "") || target }); break;
        default: notice(target, "unknown command /" + name + " — try /me, /msg, /nick, /join, /part, /topic, /rooms, /who, /ignore, /kick, /ban, /mute, /op, /mode", "error");
      }
    } else if (target && target.startsWith("@")) {
      sent = send({ type: "msg", to: target.slice(1), text });
    } else if (target) {
      sent = send({ type: "say", room: target, text: text.startsWith("//") ? text.slice(1) : text });
    } else {
      notice(null, "join a room first", "error");
    }
    if (sent) el.sayInput.value = "";
  });

  el.joinForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const name = el.joinInput.value.trim().replace(/^#/, "");
    if (!name) return;
    if (room(name).joined) select(name);
    else send({ type: "join", room: name });
    el.joinInput.value = "";
    el.sayInput.focus();
  });

  el.nickForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const nick = el.nickInput.value.trim();
    if (nick && nick !== myNick) send({ type: "nick", nick });
  });

  el.accountForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const password = el.password.value;
    if (password) send({ type: "login", nick: el.nickInput.value.trim(), password });
    el.password.value = "";
  });

  el.register.addEventListener("click", () => {
    const password = el.password.value;
    if (password) send({ type: "register", password });
    el.password.value = "";
  });

  el.logout.addEventListener("click", () => {
    const session = localStorage.getItem(SESSION);
    if (session) send({ type: "logout", session });
    localStorage.removeItem(SESSION);
    el.logout.hidden = true;
    el.accountForm.hidden = false;
    if (ws) ws.close(1000, "logged out");
  });

  el.part.addEventListener("click", () => {
    if (current && !current.startsWith("@")) send({ type: "part", room: current });
  });

  // Keyboard: Alt+Up / Alt+Down switch rooms; Escape returns to the message box.
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { el.sayInput.focus(); return; }
    if (e.altKey && (e.key === "ArrowUp" || e.key === "ArrowDown")) {
      const names = [...rooms.entries()].filter(([n, r]) => r.joined || n.startsWith("@")).map(([n]) => n);
      if (names.length === 0) return;
      const i = Math.max(0, names.indexOf(current));
      const j = (i + (e.key === "ArrowDown" ? 1 : names.length - 1)) % names.length;
      select(names[j]);
      e.preventDefault();
    }
  });

  // Files: a ticket from the hub over the WebSocket proves room membership;
  // the upload is created with POST, then sent with PATCH from its offset,
  // resumed after a dropped connection (docs/chat-protocol.md, "Files").
  const ticketWaiters = new Map();
  function ticket(roomName) {
    return new Promise((resolve, reject) => {
      const list = ticketWaiters.get(roomName) || [];
      list.push(resolve);
      ticketWaiters.set(roomName, list);
      if (!send({ type: "file_ticket", room: roomName })) { reject(new Error("not connected")); return; }
      setTimeout(() => reject(new Error("no upload ticket (are you in the room?)")), 10000);
    });
  }

  // One HTTP request with upload progress (fetch has none); resolves with the XHR.
  function xhr(method, url, auth, body, onProgress, headers, keep) {
    return new Promise((resolve, reject) => {
      const x = new XMLHttpRequest();
      keep.xhr = x;
      x.open(method, url);
      x.setRequestHeader("Authorization", "Bearer " + auth);
      for (const [k, v] of Object.entries(headers || {})) x.setRequestHeader(k, v);
      if (onProgress) x.upload.onprogress = (e) => onProgress(e.loaded);
      x.onload = () => resolve(x);
      x.onerror = () => reject(new Error("connection lost"));
      x.onabort = () => reject(new Error("cancelled"));
      x.send(body);
    });
  }

  function errorText(x) {
    try { return JSON.parse(x.responseText).error.message; } catch { return "HTTP " + x.status; }
  }

  async function upload(file, roomName) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "upload-name";
    label.textContent = file.name + " → #" + roomName;
    const bar = document.createElement("progress");
    bar.max = file.size || 1;
    bar.value = 0;
    bar.setAttribute("aria-label", "Upload of " + file.name);
    const state = document.createElement("span");
    state.className = "upload-state";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.textContent = "Cancel";
    li.append(label, bar, state, cancel);
    el.uploads.appendChild(li);
    const keep = { xhr: null, cancelled: false, url: null, auth: null };
    cancel.addEventListener("click", () => {
      keep.cancelled = true;
      if (keep.xhr) keep.xhr.abort();
      if (keep.url) fetch(keep.url, { method: "DELETE", headers: { Authorization: "Bearer " + keep.auth } }).catch(() => {});
      li.remove();
    });
    const done = (text, failed) => {
      state.textContent = text;
      cancel.remove();
      if (failed) li.className = "failed";
      setTimeout(() => li.remove(), failed ? 15000 : 3000);
    };
    try {
      keep.auth = await ticket(roomName);
      const q = "?name=" + encodeURIComponent(file.name) + "&size=" + file.size;
      let x = await xhr("POST", "/api/rooms/" + encodeURIComponent(roomName) + "/files" + q, keep.auth, null, null, {}, keep);
      if (x.status !== 201) return done(errorText(x), true);
      let res = JSON.parse(x.responseText);
      keep.url = res.url;
      let offset = res.offset, tries = 0;
      while (!res.file) {
        state.textContent = humanSize(offset) + " of " + humanSize(file.size);
        try {
          x = await xhr("PATCH", keep.url, keep.auth, file.slice(offset), (n) => { bar.value = offset + n; },
            { "Upload-Offset": String(offset), "Content-Type": "application/offset+octet-stream" }, keep);
        } catch (e) {
          if (keep.cancelled) return;
          // Dropped: wait, take a fresh ticket, ask where the upload stands, go on from there.
          if (++tries > 8) return done("gave up: " + e.message, true);
          state.textContent = "connection lost — resuming…";
          await new Promise((r) => setTimeout(r, Math.min(500 * 2 ** tries, 15000)));
          try {
            keep.auth = await ticket(roomName);
            const h = await fetch(keep.url, { method: "HEAD", headers: { Authorization: "Bearer " + keep.auth } });
            if (h.ok) offset = Number(h.headers.get("Upload-Offset"));
            else if (h.status === 404) return done("the upload expired on the server", true);
          } catch { /* still offline: try again */ }
          continue;
        }
        if (x.status === 409 && x.getResponseHeader("Upload-Offset")) { offset = Number(x.getResponseHeader("Upload-Offset")); continue; }
        if (x.status === 408 && x.getResponseHeader("Upload-Offset")) { offset = Number(x.getResponseHeader("Upload-Offset")); continue; }
        if (x.status === 204) { offset = Number(x.getResponseHeader("Upload-Offset")); continue; }
        if (x.status !== 201) return done(errorText(x), true);
        res = JSON.parse(x.responseText);
      }
      bar.value = bar.max;
      done("shared");
    } catch (e) {
      if (!keep.cancelled) done(e.message, true);
    }
  }

  function shareFiles(files) {
    const target = current;
    if (!target || target.startsWith("@")) { notice(target, "open a room to share files in it", "error"); return; }
    for (const f of files) upload(f, target);
  }

  el.fileButton.addEventListener("click", () => el.fileInput.click());
  el.fileInput.addEventListener("change", () => {
    shareFiles([...el.fileInput.files]);
    el.fileInput.value = "";
  });
  el.chat.addEventListener("dragover", (e) => {
    if (!e.dataTransfer || ![...e.dataTransfer.types].includes("Files")) return;
    e.preventDefault();
    el.chat.classList.add("dropping");
  });
  el.chat.addEventListener("dragleave", (e) => {
    if (!el.chat.contains(e.relatedTarget)) el.chat.classList.remove("dropping");
  });
  el.chat.addEventListener("drop", (e) => {
    el.chat.classList.remove("dropping");
    if (!e.dataTransfer || e.dataTransfer.files.length === 0) return;
    e.preventDefault();
    shareFiles([...e.dataTransfer.files]);
  });

  connect();
  el.sayInput.focus();
})();

// The cluster view: the nodes this server knows, their state, HTTP address
// and users, from GET /api/cluster every 5 s (see docs/cluster.md).
(function () {
  const list = document.getElementById("cluster-list");
  if (!list) return;
  const EVERY = 5000;

  function render(report) {
    list.replaceChildren();
    for (const m of report.members || []) {
      const li = document.createElement("li");
      li.className = "node state-" + m.state + (m.self ? " self" : "");
      const name = document.createElement("span");
      name.className = "node-name";
      name.textContent = m.name + (m.self ? " (this node)" : "");
      const state = document.createElement("span");
      state.className = "node-state";
      state.textContent = m.state;
      if (typeof m.last_heard_ms === "number") {
        // Broker mode: when this hub's last presence beat arrived.
        state.title = "heard " + (m.last_heard_ms / 1000).toFixed(1) + " s ago";
      }
      const addr = document.createElement("span");
      addr.className = "node-addr";
      if (m.http && !m.self && m.state === "alive") {
        const a = document.createElement("a");
        a.href = "http://" + m.http + "/";
        a.textContent = m.http;
        addr.append(a);
      } else {
        addr.textContent = m.http || m.gossip || "";
      }
      const users = document.createElement("span");
      users.className = "node-users";
      users.textContent = Array.isArray(m.users)
        ? (m.users.length ? m.users.length + (m.users.length === 1 ? " user: " : " users: ") + m.users.join(", ") : "no users")
        : "";
      li.append(name, " ", state, " ", addr, " ", users);
      list.append(li);
    }
    if (!report.clustering) {
      const li = document.createElement("li");
      li.className = "node-note";
      li.textContent = "clustering is off";
      list.append(li);
    }
  }

  async function refresh() {
    try {
      const r = await fetch("/api/cluster", { cache: "no-store" });
      if (r.ok) render(await r.json());
    } catch {
      // Offline: the chat status already says so; try again on the next tick.
    }
  }

  refresh();
  setInterval(refresh, EVERY);
})();
