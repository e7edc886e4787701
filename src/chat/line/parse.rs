//! Parsing a line client's input: `/` commands into [`LineCommand`]s (hub
//! requests, or what the adapter itself handles), anything else said in the
//! current room.

use crate::chat::protocol::ClientMsg;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
