//! The settings of chat moderation and abuse limits ([`ModerationConfig`])
//! and their `netkit serve` flags; the rules themselves are the hub's
//! (`hub/moderation.rs`, described in docs/chat-protocol.md "Moderation").

use super::names::name_key;

/// Moderation settings of a hub.
#[derive(Debug, Clone, Default)]
pub struct ModerationConfig {
    /// Name keys of the server admins' accounts: logged in to one, a client
    /// may moderate every room and close rooms.
    pub admins: Vec<String>,
    /// Guest nicks handed out per minute per address (0 = no limit; loopback is exempt).
    pub guests_per_minute: u32,
    /// The same text more than this many times in a row from one client is refused (0 = no limit).
    pub max_repeats: usize,
}

/// The flags of chat moderation, for `netkit serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatModerationArgs {
    /// Server admins: registered nicks that, once logged in, may moderate
    /// every room and /close rooms (meaningful with --chat-auth accounts or required).
    #[arg(long, value_delimiter = ',', env = "NETKIT_CHAT_ADMINS")]
    pub chat_admins: Vec<String>,
    /// Guest nicks handed out per minute to one address (0 = no limit;
    /// loopback addresses are exempt).
    #[arg(long, default_value_t = 20, env = "NETKIT_CHAT_GUESTS_PER_MINUTE")]
    pub chat_guests_per_minute: u32,
    /// Refuse the same text sent more than this many times in a row by one client (0 = no limit).
    #[arg(long, default_value_t = 5, env = "NETKIT_CHAT_MAX_REPEATS")]
    pub chat_max_repeats: usize,
}

impl ChatModerationArgs {
    /// The moderation settings these flags describe.
    pub fn config(&self) -> ModerationConfig {
        ModerationConfig {
            admins: self
                .chat_admins
                .iter()
                .map(|n| n.trim())
                .filter(|n| !n.is_empty())
                .map(name_key)
                .collect(),
            guests_per_minute: self.chat_guests_per_minute,
            max_repeats: self.chat_max_repeats,
        }
    }
}
