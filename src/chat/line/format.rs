//! Rendering hub messages as the readable lines a line client (and
//! `netkit chat`) shows: one line per event, control characters removed.

use crate::chat::protocol::{
    ChatMessage, MessageKind, PresenceEvent, RemoteMember, RoomInfo, ServerMsg,
};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_render_without_control_characters() {
        let m = ServerMsg::Message(ChatMessage {
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
        let file = crate::chat::protocol::FileRef {
            name: "re\u{1b}[2Jport.pdf".into(),
            size: 2_100_000,
            blake3: "ab".repeat(32),
            url: "http://127.0.0.1:8080/files/r/x/report.pdf".into(),
            mime: "application/pdf".into(),
            expired: false,
            thumb: None,
        };
        let m = ServerMsg::Message(ChatMessage {
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
