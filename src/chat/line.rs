//! The TCP line adapter: `nc 127.0.0.1 8330` users chat in the same rooms as
//! WebSocket users. A line starting with `/` is a command (`/join`, `/msg`, …);
//! any other line is said in the current room. Hub messages are rendered as
//! readable lines by [`format_line`] (also used by `netkit chat`).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

use super::ConnConfig;
use super::hub::Session;
use super::hub::{Hub, Inbox, Received};
use super::protocol::{
    ChatMessage, ClientMsg, MessageKind, PresenceEvent, RemoteMember, RoomInfo, ServerMsg,
};

/// The help text of the line protocol.
pub const HELP: &str = "\
commands:
  /nick NAME          change your nickname
  /join ROOM [ID]     join a room (resume after message ID)
  /part [ROOM]        leave a room (default: the current one)
  /rooms              list rooms
  /who [ROOM]         list a room's members
  /msg NICK TEXT      direct message to one user
  /me TEXT            action in the current room
  /topic [TEXT]       show or set the current room's topic
  /register PASSWORD  register the nick you hold (servers with accounts)
  /login NICK PASSWORD  log in to a registered nick
  /token TOKEN        log in with an application token
  /ignore NICK        stop showing NICK's messages (/unignore NICK)
  /ticket [ROOM]      an upload ticket: netkit send FILE --room ROOM --ticket T --to DROP
operators of the current room (the first member of a new room is one):
  /op NICK, /deop NICK, /voice NICK, /devoice NICK
  /kick NICK [REASON]
  /ban [-a] NICK|ACCOUNT [DURATION] [REASON]   (-a: the address too)
  /unban NICK|ACCOUNT
  /mute NICK [DURATION], /unmute NICK
  /mode +m|-m|+i|-i   moderated (only voiced speak), invite-only
  /invite NICK
  /close ROOM         (server admins) put everyone out, make it invite-only
  /help               this text
  /quit               disconnect
any other line is said in the current room; start it with // to say a line beginning with /";

/// What a typed line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineCommand {
    /// A request for the hub.
    Hub(ClientMsg),
    /// Show the help.
    Help,
    /// Disconnect.
    Quit,
    /// Nothing to do (blank line).
    Nothing,
    /// Stop (`true`) or start again showing a nick's messages and direct messages.
    Ignore(String, bool),
}

/// Parses one typed line; `current` is the room plain text goes to.
pub fn parse_line(line: &str, current: Option<&str>) -> Result<LineCommand, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(LineCommand::Nothing);
    }
    if let Some(rest) = line.strip_prefix("//") {
        return Ok(LineCommand::Hub(ClientMsg::Say {
            room: need_room(current)?,
            text: format!("/{rest}"),
        }));
    }
    let Some(cmdline) = line.strip_prefix('/') else {
        return Ok(LineCommand::Hub(ClientMsg::Say {
            room: need_room(current)?,
            text: line.to_string(),
        }));
    };
    let (cmd, rest) = match cmdline.split_once(char::is_whitespace) {
        Some((c, r)) => (c, r.trim()),
        None => (cmdline, ""),
    };
    parse_command(cmd, rest, current)
}

/// Parses a `/command` with its argument `rest`; `current` as for [`parse_line`].
fn parse_command(cmd: &str, rest: &str, current: Option<&str>) -> Result<LineCommand, String> {
    let msg = match cmd.to_ascii_lowercase().as_str() {
        "help" | "?" => return Ok(LineCommand::Help),
        "quit" | "exit" => return Ok(LineCommand::Quit),
        "nick" if !rest.is_empty() => ClientMsg::Nick {
            nick: rest.to_string(),
        },
        "join" if !rest.is_empty() => parse_join(rest)?,
        "part" | "leave" => ClientMsg::Part {
            room: if rest.is_empty() {
                need_room(current)?
            } else {
                room_arg(rest)
            },
        },
        "rooms" | "list" => ClientMsg::Rooms,
        "ticket" => ClientMsg::FileTicket {
            room: if rest.is_empty() {
                need_room(current)?
            } else {
                room_arg(rest)
            },
        },
        "who" | "names" => ClientMsg::Who {
            room: if rest.is_empty() {
                need_room(current)?
            } else {
                room_arg(rest)
            },
        },
        "msg" | "query" => match rest.split_once(char::is_whitespace) {
            Some((to, text)) if !text.trim().is_empty() => ClientMsg::Msg {
                to: to.to_string(),
                text: text.trim().to_string(),
            },
            _ => return Err("usage: /msg NICK TEXT".into()),
        },
        "me" if !rest.is_empty() => ClientMsg::Me {
            room: need_room(current)?,
            text: rest.to_string(),
        },
        "topic" if rest.is_empty() => {
            return Err("usage: /topic TEXT (/rooms shows every topic)".into());
        }
        "topic" => ClientMsg::Topic {
            room: need_room(current)?,
            topic: rest.to_string(),
        },
        "register" if !rest.is_empty() => ClientMsg::Register {
            password: rest.to_string(),
        },
        "login" => match rest.split_once(char::is_whitespace) {
            Some((nick, password)) if !password.trim().is_empty() => ClientMsg::Login {
                nick: Some(nick.to_string()),
                password: Some(password.trim().to_string()),
                session: None,
            },
            _ => return Err("usage: /login NICK PASSWORD".into()),
        },
        "token" | "auth" if !rest.is_empty() => ClientMsg::Auth {
            token: rest.to_string(),
        },
        "ignore" | "unignore" if !rest.is_empty() => {
            return Ok(LineCommand::Ignore(
                rest.to_string(),
                cmd.eq_ignore_ascii_case("ignore"),
            ));
        }
        "op" | "deop" | "voice" | "devoice" | "kick" | "ban" | "unban" | "mute" | "unmute"
        | "mode" | "invite" | "close"
            if !rest.is_empty() =>
        {
            parse_moderation(&cmd.to_ascii_lowercase(), rest, current)?
        }
        "nick" | "join" | "me" | "register" | "token" | "auth" | "ignore" | "unignore" | "op"
        | "deop" | "voice" | "devoice" | "kick" | "ban" | "unban" | "mute" | "unmute" | "mode"
        | "invite" | "close" => {
            return Err(format!("/{cmd} needs an argument; /help"));
        }
        _ => return Err(format!("unknown command /{cmd}; /help lists them")),
    };
    Ok(LineCommand::Hub(msg))
}

/// A moderation command for the current room (`/close` names its room).
fn parse_moderation(cmd: &str, rest: &str, current: Option<&str>) -> Result<ClientMsg, String> {
    if cmd == "close" {
        let (room, reason) = split_word(rest);
        return Ok(ClientMsg::Close {
            room: room_arg(room),
            reason,
        });
    }
    let room = need_room(current)?;
    let (first, tail) = split_word(rest);
    let nick = first.to_string();
    Ok(match cmd {
        "op" => ClientMsg::Op { room, nick },
        "deop" => ClientMsg::Deop { room, nick },
        "voice" => ClientMsg::Voice { room, nick },
        "devoice" => ClientMsg::Devoice { room, nick },
        "unban" => ClientMsg::Unban { room, nick },
        "unmute" => ClientMsg::Unmute { room, nick },
        "invite" => ClientMsg::Invite { room, nick },
        "mode" => ClientMsg::Mode { room, mode: nick },
        "kick" => ClientMsg::Kick {
            room,
            nick,
            reason: tail,
        },
        "mute" => ClientMsg::Mute {
            room,
            nick,
            duration: tail,
        },
        _ => {
            let address = first == "-a";
            let (nick, tail) = if address {
                let (n, t) = split_word(tail.as_deref().unwrap_or_default());
                (n.to_string(), t)
            } else {
                (nick, tail)
            };
            if nick.is_empty() {
                return Err("usage: /ban [-a] NICK|ACCOUNT [DURATION] [REASON]".into());
            }
            // A first word that reads as a duration is one; the rest is the reason.
            let (duration, reason) = match tail.as_deref().map(split_word) {
                Some((d, r)) if crate::cli::parse_duration(d).is_ok() => (Some(d.to_string()), r),
                _ => (None, tail),
            };
            ClientMsg::Ban {
                room,
                nick,
                duration,
                reason,
                address,
            }
        }
    })
}

/// The first word of `s` and the rest (trimmed; `None` if empty).
fn split_word(s: &str) -> (&str, Option<String>) {
    match s.trim().split_once(char::is_whitespace) {
        Some((w, r)) if !r.trim().is_empty() => (w, Some(r.trim().to_string())),
        Some((w, _)) => (w, None),
        None => (s.trim(), None),
    }
}

/// The nicks a line client ignores (`/ignore`): their room messages and
/// direct messages are not shown; notices, presence and errors still are.
/// Shared by the reading and the writing task of a connection.
#[derive(Debug, Default)]
pub struct Ignored {
    /// Quick check: false while nobody is ignored (the common case costs one load).
    any: std::sync::atomic::AtomicBool,
    keys: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Ignored {
    /// Ignores (`on`) `nick` (and every look-alike of it), or stops ignoring it;
    /// the line that says so.
    pub fn set(&self, nick: &str, on: bool) -> String {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let key = super::names::name_key(nick);
        let told = if on {
            keys.insert(key);
            format!("ignoring {nick} (/unignore {nick} to stop)")
        } else if keys.remove(&key) {
            format!("no longer ignoring {nick}")
        } else {
            format!("you were not ignoring {nick}")
        };
        self.any
            .store(!keys.is_empty(), std::sync::atomic::Ordering::Relaxed);
        told
    }

    /// True if `msg` comes from an ignored nick and is not shown.
    pub fn hides(&self, msg: &ServerMsg) -> bool {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let from = match msg {
            ServerMsg::Message(m) if m.kind != MessageKind::Notice => &m.from,
            ServerMsg::Direct { from, .. } => from,
            _ => return false,
        };
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.contains(&super::names::name_key(from))
    }
}

/// The room plain text and room commands without a room go to.
fn need_room(current: Option<&str>) -> Result<String, String> {
    current
        .map(str::to_string)
        .ok_or_else(|| "you are in no room; /join ROOM first".to_string())
}

/// A room argument, with or without its `#`.
fn room_arg(s: &str) -> String {
    s.trim_start_matches('#').to_string()
}

/// `/join ROOM [ID]`'s argument.
fn parse_join(rest: &str) -> Result<ClientMsg, String> {
    let mut parts = rest.split_whitespace();
    let room = room_arg(parts.next().unwrap_or_default());
    let after = match parts.next() {
        Some(id) => Some(
            id.parse::<u64>()
                .map_err(|_| format!("'{id}' is not a message id; /join ROOM [ID]"))?,
        ),
        None => None,
    };
    Ok(ClientMsg::Join {
        room,
        after,
        since: None,
    })
}

/// The outcome of [`read_line_limited`].
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// A complete line is in the buffer (without its newline).
    Line,
    /// The line was longer than the limit; it was read and thrown away.
    TooLong,
    /// The peer closed the connection.
    Eof,
}

/// Reads one `\n`-terminated line into `buf`, never holding more than `max`
/// bytes: a longer line is consumed up to its newline and reported as
/// [`LineRead::TooLong`], so the connection can go on.
pub async fn read_line_limited<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    use tokio::io::AsyncBufReadExt;
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = rd.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if too_long || !buf.is_empty() {
                if too_long {
                    LineRead::TooLong
                } else {
                    LineRead::Line
                }
            } else {
                LineRead::Eof
            });
        }
        let (take, end) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        rd.consume(take + usize::from(end));
        if end {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

/// `HH:MM:SS` (UTC) of a millisecond timestamp.
pub fn clock(ts_ms: i64) -> String {
    let secs = ts_ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Renders a hub message as one human-readable line (without the newline).
/// Control characters in untrusted text are replaced so a peer cannot forge lines.
pub fn format_line(msg: &ServerMsg) -> String {
    let c = clean;
    match msg {
        ServerMsg::Welcome { nick } => format!(
            "-- welcome to netkit chat, you are {}. /join ROOM to start, /help for commands",
            c(nick)
        ),
        ServerMsg::Message(m) => format_message(m),
        ServerMsg::Joined {
            room,
            topic,
            members,
            remote,
            history,
            ..
        } => {
            let topic = if topic.is_empty() {
                String::new()
            } else {
                format!(" — topic: {}", c(topic))
            };
            format!(
                "-- joined #{}{topic} — members: {} — {history} earlier message(s) follow",
                c(room),
                c(&shown_members(members, remote).join(", "))
            )
        }
        ServerMsg::Parted { room } => format!("-- you left #{}", c(room)),
        ServerMsg::Presence {
            room,
            nick,
            event,
            node,
            reason,
        } => {
            let who = at_node(nick, node.as_deref());
            let why = reason
                .as_ref()
                .map(|r| format!(" ({})", c(r)))
                .unwrap_or_default();
            match event {
                PresenceEvent::Join => format!("-- {} joined #{}", c(&who), c(room)),
                PresenceEvent::Leave => format!("-- {} left #{}{why}", c(&who), c(room)),
            }
        }
        ServerMsg::Nick { old, new, node } => format!(
            "-- {} is now known as {}",
            c(&at_node(old, node.as_deref())),
            c(&at_node(new, node.as_deref()))
        ),
        ServerMsg::Direct { from, to, text, ts } => {
            format!("[{}] *{} -> {}* {}", clock(*ts), c(from), c(to), c(text))
        }
        ServerMsg::Topic { room, topic, by } => {
            format!("-- {} set the topic of #{}: {}", c(by), c(room), c(topic))
        }
        ServerMsg::Rooms { rooms } => format_rooms(rooms),
        ServerMsg::Members {
            room,
            members,
            remote,
        } => format!(
            "-- members of #{}: {}",
            c(room),
            c(&shown_members(members, remote).join(", "))
        ),
        ServerMsg::FileTicket { room, ticket, .. } => {
            format!("-- file upload ticket for #{}: {}", c(room), c(ticket))
        }
        ServerMsg::Error { code, message } => format!("ERR {}: {}", c(code), c(message)),
        ServerMsg::Info { text } => format!("-- {}", c(text)),
        ServerMsg::LoggedIn {
            nick, via, admin, ..
        } => {
            let admin = if *admin { ", server admin" } else { "" };
            format!("-- logged in as {} (by {}{admin})", c(nick), c(via))
        }
        ServerMsg::Modes {
            room,
            ops,
            voiced,
            moderated,
            invite_only,
        } => {
            let flags: String = [(*moderated, "m"), (*invite_only, "i")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, f)| *f)
                .collect();
            let flags = if flags.is_empty() {
                String::new()
            } else {
                format!(" +{flags}")
            };
            let voiced = if voiced.is_empty() {
                String::new()
            } else {
                format!(", voiced: {}", c(&voiced.join(", ")))
            };
            format!(
                "-- #{}{flags} — operators: {}{voiced}",
                c(room),
                c(&ops.join(", "))
            )
        }
    }
}

/// A room message: `[HH:MM:SS] #room <nick> text`, or `* nick text` for an action.
fn format_message(m: &ChatMessage) -> String {
    let c = clean;
    let who = match m.kind {
        MessageKind::Say => format!("<{}>", c(&m.from)),
        MessageKind::Me => format!("* {}", c(&m.from)),
        MessageKind::Notice => "--".to_string(),
    };
    // A file message: `<nick> shared NAME (SIZE) URL`, from the file itself.
    let text = match &m.file {
        Some(f) => f.summary(),
        None => m.text.clone(),
    };
    format!("[{}] #{} {who} {}", clock(m.ts), c(&m.room), c(&text))
}

/// The room list, each with its member count.
fn format_rooms(rooms: &[RoomInfo]) -> String {
    if rooms.is_empty() {
        return "-- no rooms yet; /join ROOM creates one".into();
    }
    let list: Vec<String> = rooms
        .iter()
        .map(|r| format!("#{} ({})", clean(&r.name), r.members))
        .collect();
    format!("-- rooms: {}", list.join(", "))
}

/// `nick`, or `nick@node` for a user of another node.
fn at_node(nick: &str, node: Option<&str>) -> String {
    match node {
        Some(n) => format!("{nick}@{n}"),
        None => nick.to_string(),
    }
}

/// A member list as shown to people: local members by nick, members of
/// other nodes as `nick@node`, sorted.
pub fn shown_members(members: &[String], remote: &[RemoteMember]) -> Vec<String> {
    let mut local: Vec<String> = members.to_vec();
    for r in remote {
        if let Some(i) = local.iter().position(|m| *m == r.nick) {
            local.remove(i);
        }
    }
    local.extend(remote.iter().map(RemoteMember::display));
    local.sort();
    local
}

fn clean(s: &str) -> String {
    s.chars()
        .map(|ch| if ch.is_control() { ' ' } else { ch })
        .collect()
}

/// Serves TCP line clients on `listener` until `shutdown` is cancelled; then
/// every client is told and closed. `door` adds TLS and the per-address limit.
pub async fn run(
    listener: TcpListener,
    hub: Hub,
    config: ConnConfig,
    door: crate::net::door::Door,
    shutdown: CancellationToken,
) {
    let local = listener.local_addr().ok();
    info!(
        "chat: listening on {} ({})",
        local.map(|a| a.to_string()).unwrap_or_default(),
        if door.is_tls() {
            "TLS lines"
        } else {
            "TCP lines"
        }
    );
    let config = Arc::new(config);
    let tracker = TaskTracker::new();
    let mut acceptor = crate::net::accept::Acceptor::new("chat");
    while let Some((stream, peer)) = acceptor.accept(&listener, &shutdown).await {
        let _ = stream.set_nodelay(true);
        let Some(permit) = door.admit(peer) else {
            continue;
        };
        // A child token per connection: polled per line, a shared one would be one contended lock.
        let (hub, config, shutdown) = (hub.clone(), config.clone(), shutdown.child_token());
        let door = door.clone();
        tracker.spawn(
            async move {
                debug!("accepted");
                let _permit = permit;
                match door.handshake(stream).await {
                    Some(Either::Right(plain)) => serve_conn(plain, hub, &config, shutdown).await,
                    Some(Either::Left(tls)) => {
                        let (rd, wr) = tokio::io::split(tls);
                        serve_halves(rd, wr, Some(peer.ip()), hub, &config, shutdown).await
                    }
                    None => return,
                }
                debug!("closed");
            }
            .instrument(info_span!("chat-line", %peer)),
        );
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Serves one line client: this task reads and hands requests to the hub;
/// a second task writes. When either ends, the other stops.
pub async fn serve_conn(
    stream: TcpStream,
    hub: Hub,
    config: &ConnConfig,
    shutdown: CancellationToken,
) {
    let peer = stream.peer_addr().ok().map(|a| a.ip());
    let (rd, wr) = stream.into_split();
    serve_halves(rd, wr, peer, hub, config, shutdown).await
}

/// [`serve_conn`] over the two halves of any stream (a TLS one included),
/// from `peer` (for the per-address login limit).
pub async fn serve_halves<R, W>(
    rd: R,
    mut wr: W,
    peer: Option<std::net::IpAddr>,
    hub: Hub,
    config: &ConnConfig,
    shutdown: CancellationToken,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (session, inbox) = match hub.connect_from(None, peer) {
        Ok(pair) => pair,
        Err(e) => {
            let line = format!("{}\n", format_line(&e.to_msg()));
            let _ = tokio::time::timeout(config.write_timeout, wr.write_all(line.as_bytes())).await;
            return;
        }
    };
    let mut session = session;
    let ignored = Arc::new(Ignored::default());
    let done = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        BufWriter::new(wr),
        (inbox, ignored.clone()),
        config.write_timeout,
        done.clone(),
        shutdown.clone(),
    ));
    let mut rd = tokio::io::BufReader::new(rd);
    let mut bytes = Vec::new();
    loop {
        // The next line is read only once the replies to the last ones fit
        // the client's queue (backpressure on a client that sends faster
        // than it reads).
        let read = async {
            session.room_for_replies().await;
            tokio::time::timeout(
                config.idle_timeout,
                read_line_limited(&mut rd, &mut bytes, config.max_msg),
            )
            .await
        };
        let next = tokio::select! {
            _ = done.cancelled() => break,
            _ = shutdown.cancelled() => break,
            r = read => r,
        };
        match next {
            Err(_) => {
                session.tell(ServerMsg::error(
                    "idle_timeout",
                    format!(
                        "nothing received for {}; closing",
                        humantime::format_duration(config.idle_timeout)
                    ),
                ));
                break;
            }
            Ok(Ok(LineRead::Eof)) => break,
            Ok(Ok(LineRead::TooLong)) => {
                session.tell(ServerMsg::error(
                    "too_large",
                    format!("line longer than {} bytes ignored", config.max_msg),
                ));
                continue;
            }
            Ok(Err(e)) => {
                debug!("read failed: {e}");
                break;
            }
            Ok(Ok(LineRead::Line)) => {}
        }
        let line = String::from_utf8_lossy(&bytes);
        if !run_line(&mut session, &ignored, &line).await {
            break;
        }
    }
    // Every line read has taken effect and its replies are queued before the
    // writer is told to flush and stop.
    session.settle().await;
    done.cancel();
    // Let the writer flush what is queued (bounded by its write timeout).
    drop(session);
    let _ = writer.await;
}

/// Carries out one typed line, after the earlier ones have taken effect:
/// plain text goes to the hub's current room for the client. False when the
/// client quits.
async fn run_line(session: &mut Session, ignored: &Ignored, line: &str) -> bool {
    let current = session.current_room().await;
    match parse_line(line, current.as_deref()) {
        Ok(LineCommand::Nothing) => {}
        Ok(LineCommand::Ignore(nick, on)) => session.tell(ServerMsg::Info {
            text: ignored.set(&nick, on),
        }),
        Ok(LineCommand::Help) => {
            for l in HELP.lines() {
                session.tell(ServerMsg::Info { text: l.into() });
            }
        }
        Ok(LineCommand::Quit) => return false,
        Ok(LineCommand::Hub(msg)) => {
            if let Err(e) = session.handle(msg).await {
                session.report(e);
            }
        }
        Err(e) => session.tell(ServerMsg::error("bad_command", e)),
    }
    true
}

/// Writes what the client is sent, as lines, until the reader ends, the
/// client is disconnected (told why) or the server shuts down.
async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    (mut inbox, ignored): (Inbox, Arc<Ignored>),
    write_timeout: Duration,
    done: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut buf = String::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(write_timeout, async {
                    let _ = wr.write_all(b"ERR shutting_down: server shutting down\n").await;
                    wr.flush().await
                }).await;
                break;
            }
            r = inbox.recv() => r,
            _ = done.cancelled() => {
                // Reader ended: flush what is already queued, then stop.
                while let Some(ev) = inbox.try_recv() {
                    buf.clear();
                    push_line(&mut buf, &ev.msg, &ignored);
                    if tokio::time::timeout(write_timeout, wr.write_all(buf.as_bytes())).await.is_err() {
                        break;
                    }
                }
                let _ = tokio::time::timeout(write_timeout, wr.flush()).await;
                break;
            }
        };
        buf.clear();
        match first {
            Received::Event(ev) => push_line(&mut buf, &ev.msg, &ignored),
            Received::Disconnected(reason) => {
                let line = format!("ERR {}: {reason}\n", reason.code());
                let _ = tokio::time::timeout(write_timeout, async {
                    let _ = wr.write_all(line.as_bytes()).await;
                    wr.flush().await
                })
                .await;
                break;
            }
            Received::Closed => break,
        }
        while buf.len() < 64 * 1024 {
            match inbox.try_recv() {
                Some(ev) => push_line(&mut buf, &ev.msg, &ignored),
                None => break,
            }
        }
        let wrote = tokio::time::timeout(write_timeout, async {
            wr.write_all(buf.as_bytes()).await?;
            wr.flush().await
        })
        .await;
        match wrote {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!("write failed: {e}");
                break;
            }
            Err(_) => {
                info!(
                    "write timed out after {}; closing",
                    humantime::format_duration(write_timeout)
                );
                break;
            }
        }
    }
    // A clean end: FIN, and over TLS the close_notify the client waits for.
    let _ = tokio::time::timeout(write_timeout.min(Duration::from_secs(1)), wr.shutdown()).await;
    done.cancel();
}

fn push_line(buf: &mut String, msg: &ServerMsg, ignored: &Ignored) {
    if ignored.hides(msg) {
        return;
    }
    buf.push_str(&format_line(msg));
    buf.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_skipped_not_fatal() {
        let input: &[u8] = b"short\nthis line is too long\nok\r\nlast";
        let mut rd = tokio::io::BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        loop {
            let r = read_line_limited(&mut rd, &mut buf, 8).await.unwrap();
            if r == LineRead::Eof {
                break;
            }
            got.push((r, String::from_utf8_lossy(&buf).to_string()));
        }
        assert_eq!(
            got,
            vec![
                (LineRead::Line, "short".into()),
                (LineRead::TooLong, String::new()),
                (LineRead::Line, "ok\r".into()),
                (LineRead::Line, "last".into()),
            ]
        );
    }

    #[test]
    fn commands_parse() {
        let say = |r: &str, t: &str| {
            LineCommand::Hub(ClientMsg::Say {
                room: r.into(),
                text: t.into(),
            })
        };
        assert_eq!(
            parse_line("hello\r\n", Some("a")).unwrap(),
            say("a", "hello")
        );
        assert_eq!(parse_line("//etc", Some("a")).unwrap(), say("a", "/etc"));
        assert!(parse_line("hello", None).is_err());
        assert_eq!(
            parse_line("/join #dev 42", None).unwrap(),
            LineCommand::Hub(ClientMsg::Join {
                room: "dev".into(),
                after: Some(42),
                since: None
            })
        );
        assert_eq!(
            parse_line("/msg bob hi there", None).unwrap(),
            LineCommand::Hub(ClientMsg::Msg {
                to: "bob".into(),
                text: "hi there".into()
            })
        );
        assert_eq!(parse_line("/quit", None).unwrap(), LineCommand::Quit);
        assert_eq!(
            parse_line("/ticket", Some("dev")).unwrap(),
            LineCommand::Hub(ClientMsg::FileTicket { room: "dev".into() })
        );
        assert_eq!(
            parse_line("/ticket #ops", Some("dev")).unwrap(),
            LineCommand::Hub(ClientMsg::FileTicket { room: "ops".into() })
        );
        assert!(parse_line("/ticket", None).is_err());
        assert!(parse_line("/frobnicate", None).is_err());
        assert!(parse_line("/msg bob", None).is_err());
        assert_eq!(parse_line("   ", None).unwrap(), LineCommand::Nothing);
    }

    #[test]
    fn moderation_commands_parse() {
        let hub = |l: &str| match parse_line(l, Some("dev")).unwrap() {
            LineCommand::Hub(m) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            hub("/kick bob too loud"),
            ClientMsg::Kick {
                room: "dev".into(),
                nick: "bob".into(),
                reason: Some("too loud".into())
            }
        );
        assert_eq!(
            hub("/ban -a eve 2h spam wave"),
            ClientMsg::Ban {
                room: "dev".into(),
                nick: "eve".into(),
                duration: Some("2h".into()),
                reason: Some("spam wave".into()),
                address: true
            }
        );
        assert_eq!(
            hub("/ban eve being rude"),
            ClientMsg::Ban {
                room: "dev".into(),
                nick: "eve".into(),
                duration: None,
                reason: Some("being rude".into()),
                address: false
            }
        );
        assert_eq!(
            hub("/mode +m"),
            ClientMsg::Mode {
                room: "dev".into(),
                mode: "+m".into()
            }
        );
        assert_eq!(
            hub("/close #dev done"),
            ClientMsg::Close {
                room: "dev".into(),
                reason: Some("done".into())
            }
        );
        assert_eq!(
            parse_line("/ignore bob", None).unwrap(),
            LineCommand::Ignore("bob".into(), true)
        );
        assert!(parse_line("/kick", Some("dev")).is_err());
        assert!(parse_line("/kick bob", None).is_err());
        assert!(parse_line("/ban -a", Some("dev")).is_err());
    }

    #[test]
    fn lines_render_without_control_characters() {
        let m = ServerMsg::Message(super::super::protocol::ChatMessage {
            room: "r".into(),
            id: 1,
            from: "ann".into(),
            text: "hi\nERR fake".into(),
            ts: 3_661_000,
            kind: MessageKind::Say,
            origin: None,
            origin_id: 0,
            file: None,
        });
        assert_eq!(format_line(&m), "[01:01:01] #r <ann> hi ERR fake");
    }

    #[test]
    fn file_messages_render_as_shared_lines() {
        let file = super::super::protocol::FileRef {
            name: "re\u{1b}[2Jport.pdf".into(),
            size: 2_100_000,
            blake3: "ab".repeat(32),
            url: "http://127.0.0.1:8080/files/r/x/report.pdf".into(),
            mime: "application/pdf".into(),
            expired: false,
            thumb: None,
        };
        let m = ServerMsg::Message(super::super::protocol::ChatMessage {
            room: "r".into(),
            id: 1,
            from: "ann".into(),
            text: "ignored".into(),
            ts: 0,
            kind: MessageKind::Say,
            origin: None,
            origin_id: 0,
            file: Some(Box::new(file)),
        });
        assert_eq!(
            format_line(&m),
            "[00:00:00] #r <ann> shared re [2Jport.pdf (2.1 MB) http://127.0.0.1:8080/files/r/x/report.pdf"
        );
    }
}
