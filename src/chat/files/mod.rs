//! Files shared in chat rooms, on disk: resumable uploads (a part file per
//! upload, BLAKE3 computed as it arrives), the limits (largest file, bytes
//! per room, which rooms, free space), and the content-addressed store
//! `<data-dir>/rooms/<room>/files/<blake3>` that downloads read from.
//! Transport-agnostic: `http::files` speaks HTTP over it.

mod drop;
mod fetch;
pub mod names;
mod retention;
pub mod thumbs;
mod upload;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::cli::{parse_duration, parse_size};

pub use drop::RoomDrop;
pub use retention::run_retention;
pub use upload::{Progress, StoredFile};

/// Folder (inside a room's folder) of the files shared there.
const FILES_DIR: &str = "files";
/// Folder (inside a room's `files`) of uploads in progress.
const PARTIAL_DIR: &str = ".partial";
/// Folder (inside a room's `files`) the drop receives files into.
const DROP_DIR: &str = ".drop";
/// Thumbnails made at once, on the whole server (each decode is bounded by
/// the memory limit in [`thumbs`]; this bounds their sum).
static THUMBNAIL_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Most uploads in progress at once, on the whole server.
pub const MAX_UPLOADS: usize = 1024;

/// Flags of `netkit serve` for files shared in rooms.
#[derive(Debug, Clone, clap::Args)]
pub struct FileArgs {
    /// Largest file that may be shared in a room.
    #[arg(long, default_value = "1GiB", value_parser = parse_size, env = "NETKIT_FILE_MAX_SIZE")]
    pub file_max_size: u64,
    /// Most bytes of files one room may hold (identical files count once).
    #[arg(long, default_value = "10GiB", value_parser = parse_size, env = "NETKIT_FILE_ROOM_QUOTA")]
    pub file_room_quota: u64,
    /// Rooms where files may be shared, comma-separated; `*` for every
    /// room, `none` for none.
    #[arg(
        long,
        default_value = "*",
        value_delimiter = ',',
        env = "NETKIT_FILE_ROOMS"
    )]
    pub file_rooms: Vec<String>,
    /// Free space an upload must leave on the data dir's file system; an
    /// upload that would leave less is refused before it starts.
    #[arg(long, default_value = "64MiB", value_parser = parse_size, env = "NETKIT_FILE_MIN_FREE")]
    pub file_min_free: u64,
    /// An upload that sends nothing for this long is cut (and can resume).
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "NETKIT_FILE_STALL_TIMEOUT")]
    pub file_stall_timeout: Duration,
    /// An unfinished upload untouched for this long is removed.
    #[arg(long, default_value = "1h", value_parser = parse_duration, env = "NETKIT_FILE_RESUME_WINDOW")]
    pub file_resume_window: Duration,
    /// Most bytes of files one user (nick) may share per day (UTC), counted
    /// from the start of each upload (a cancelled one is given back).
    #[arg(long, default_value = "4GiB", value_parser = parse_size, env = "NETKIT_FILE_USER_DAILY_QUOTA")]
    pub file_user_daily_quota: u64,
    /// Remove files older than this many days that no message shared in
    /// that time; their messages then say the file expired (0: keep forever).
    #[arg(long, default_value_t = 0, env = "NETKIT_ROOM_FILES_RETENTION_DAYS")]
    pub room_files_retention_days: u32,
    /// The URL the HTTP door is reached at (e.g. https://chat.example.org),
    /// for the links in file messages; by default the scheme and Host of
    /// the upload request.
    #[arg(long, env = "NETKIT_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Images (PNG, JPEG, GIF, WebP) up to this size get a thumbnail made
    /// on the server, shown on the page instead of the image (0: none).
    #[arg(long, default_value = "20MiB", value_parser = parse_size, env = "NETKIT_ROOM_FILES_THUMBNAIL_MAX_BYTES")]
    pub room_files_thumbnail_max_bytes: u64,
}

/// The limits and policy of shared files.
#[derive(Debug, Clone)]
pub struct FileLimits {
    /// Largest file in bytes.
    pub max_size: u64,
    /// Most bytes per room.
    pub room_quota: u64,
    /// Rooms that allow files; `None` allows every room.
    pub rooms: Option<Vec<String>>,
    /// Free bytes an upload must leave.
    pub min_free: u64,
    /// How long an upload may send nothing.
    pub stall_timeout: Duration,
    /// How long an unfinished upload is kept untouched.
    pub resume_window: Duration,
    /// Base of download links, without a trailing `/`.
    pub public_url: Option<String>,
    /// Most bytes per user per day.
    pub user_daily_quota: u64,
    /// How long an unshared file is kept; `None` keeps it forever.
    pub retention: Option<Duration>,
    /// Largest image that gets a thumbnail (0: none).
    pub thumbnail_max_bytes: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            max_size: 1 << 30,
            room_quota: 10 << 30,
            rooms: None,
            min_free: 64 << 20,
            stall_timeout: Duration::from_secs(30),
            resume_window: Duration::from_secs(3600),
            public_url: None,
            user_daily_quota: 4 << 30,
            retention: None,
            thumbnail_max_bytes: 20 << 20,
        }
    }
}

impl FileArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> FileLimits {
        let rooms: Vec<String> = self
            .file_rooms
            .iter()
            .map(|r| r.trim().trim_start_matches('#').to_string())
            .filter(|r| !r.is_empty() && r != "none")
            .collect();
        FileLimits {
            max_size: self.file_max_size,
            room_quota: self.file_room_quota,
            rooms: (!rooms.iter().any(|r| r == "*")).then_some(rooms),
            min_free: self.file_min_free,
            stall_timeout: self.file_stall_timeout,
            resume_window: self.file_resume_window,
            public_url: self
                .public_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_string()),
            user_daily_quota: self.file_user_daily_quota,
            retention: (self.room_files_retention_days > 0)
                .then(|| Duration::from_secs(u64::from(self.room_files_retention_days) * 86_400)),
            thumbnail_max_bytes: self.room_files_thumbnail_max_bytes,
        }
    }
}

/// `http(s)://ADDRESS` of the HTTP door bound at `addr` (an unspecified
/// address as loopback), the default base of download links.
pub fn door_url(addr: Option<std::net::SocketAddr>, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    match addr {
        Some(mut a) => {
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("{scheme}://{a}")
        }
        None => format!("{scheme}://localhost"),
    }
}

/// Why an upload or a download is refused; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The room does not take files.
    #[error("room '{0}' does not take files (see --file-rooms)")]
    RoomClosed(String),
    /// The name is not acceptable.
    #[error("{0}")]
    BadName(#[from] names::BadName),
    /// Larger than `--file-max-size`.
    #[error("the file is {size} bytes; the largest allowed is {max} (--file-max-size)")]
    TooLarge {
        /// Declared size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The room's quota would be exceeded.
    #[error(
        "room '{room}' holds {used} bytes of files (and {reserved} in uploads); {size} more would pass its quota of {quota} (--file-room-quota)"
    )]
    OverQuota {
        /// Room name.
        room: String,
        /// Bytes stored.
        used: u64,
        /// Bytes reserved by uploads in progress.
        reserved: u64,
        /// This upload's size.
        size: u64,
        /// The quota.
        quota: u64,
    },
    /// The user's bytes for today would pass `--file-user-daily-quota`.
    #[error(
        "{user} has shared {used} bytes today; {size} more would pass the daily quota of {quota} (--file-user-daily-quota)"
    )]
    OverUserQuota {
        /// The user (nick).
        user: String,
        /// Bytes counted today.
        used: u64,
        /// This file's size.
        size: u64,
        /// The quota.
        quota: u64,
    },
    /// Not enough free space on the disk.
    #[error(
        "not enough disk space: {free} bytes free, {need} needed (with the uploads in progress and --file-min-free)"
    )]
    DiskFull {
        /// Free bytes.
        free: u64,
        /// Bytes needed, the reserve included.
        need: u64,
    },
    /// Too many uploads in progress.
    #[error("too many uploads in progress ({MAX_UPLOADS}); try again later")]
    Busy,
    /// No such upload (never made, finished, cancelled or expired).
    #[error("no upload '{0}' in this room; it finished, was cancelled or expired")]
    NoSuchUpload(String),
    /// Another request is writing this upload now.
    #[error("another request is sending this upload now")]
    InUse,
    /// The request's offset is not where the upload stands.
    #[error("the upload stands at byte {have}, not {asked}; resume from {have}")]
    Offset {
        /// Where it stands.
        have: u64,
        /// What the request said.
        asked: u64,
    },
    /// More bytes than the declared size arrived; the upload is removed.
    #[error("more than the declared {size} bytes arrived; the upload is cancelled")]
    SizeLie {
        /// Declared size.
        size: u64,
    },
    /// Nothing arrived for the stall timeout; the upload can resume.
    #[error("nothing arrived for {0:?}; resume from byte {1}")]
    Stalled(Duration, u64),
    /// The request body broke off (or the server is stopping); the upload can resume.
    #[error("the upload broke off at byte {0}; resume from there")]
    Cut(u64),
    /// No such file.
    #[error("no such file")]
    NotFound,
    /// The disk failed.
    #[error("file store: {0}")]
    Io(#[from] io::Error),
}

/// One upload in progress.
#[derive(Debug)]
pub struct Upload {
    /// Its id (random, 32 hex digits): whoever knows it may continue it.
    pub id: String,
    /// The room it goes to.
    pub room: String,
    /// Who sends it (their daily quota is charged).
    pub user: String,
    /// The file's name.
    pub name: String,
    /// The declared size.
    pub size: u64,
    /// Bytes received and written so far.
    offset: AtomicU64,
    /// The part file and the hash so far; held by the request sending.
    part: tokio::sync::Mutex<upload::Part>,
    /// When a request last touched it.
    touched: Mutex<Instant>,
}

impl Upload {
    /// Bytes received so far (where the next request resumes).
    pub fn offset(&self) -> u64 {
        self.offset.load(Ordering::Acquire)
    }

    fn touch(&self) {
        *lock(&self.touched) = Instant::now();
    }
}

/// The files of every room, and the uploads in progress.
pub struct FileStore {
    /// `<data-dir>/rooms`.
    root: PathBuf,
    limits: FileLimits,
    uploads: Mutex<HashMap<String, Arc<Upload>>>,
    /// Bytes stored per room (read from disk on first use).
    used: Mutex<HashMap<String, u64>>,
    /// Bytes charged per user: (UTC day number, bytes that day).
    daily: Mutex<HashMap<String, (i64, u64)>>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("root", &self.root)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FileStore {
    /// Opens the store under `<data_dir>/rooms`, removing the part files of
    /// uploads a previous run left (their state was in memory) and of
    /// thumbnails it was writing when it stopped.
    pub fn open(data_dir: &Path, limits: FileLimits) -> io::Result<FileStore> {
        let root = data_dir.join("rooms");
        std::fs::create_dir_all(&root)?;
        for room in std::fs::read_dir(&root)? {
            let files = room?.path().join(FILES_DIR);
            let partial = files.join(PARTIAL_DIR);
            if partial.is_dir() {
                std::fs::remove_dir_all(&partial)?;
            }
            thumbs::remove_parts(&files)?;
        }
        Ok(FileStore {
            root,
            limits,
            uploads: Mutex::new(HashMap::new()),
            used: Mutex::new(HashMap::new()),
            daily: Mutex::new(HashMap::new()),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &FileLimits {
        &self.limits
    }

    /// The thumbnail of `room`'s file `hex` (see [`thumbs`]), if any.
    pub fn thumbnail(&self, room: &str, hex: &str) -> Result<PathBuf, FileError> {
        self.stored(room, hex)?;
        let path = thumbs::path(&self.files_dir(room), hex);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(path),
            _ => Err(FileError::NotFound),
        }
    }

    /// The thumbnail of `room`'s stored file `hex`, made now if it is an
    /// image within the limit that has none yet (a file this hub fetched from
    /// another one of the cluster, whose thumbnail was made there).
    pub async fn thumbnail_or_make(&self, room: &str, hex: &str) -> Result<PathBuf, FileError> {
        let file = self.stored(room, hex)?;
        if let Ok(p) = self.thumbnail(room, hex) {
            return Ok(p);
        }
        let head = tokio::task::spawn_blocking(move || -> io::Result<(Vec<u8>, u64)> {
            use std::io::Read;
            let f = std::fs::File::open(file)?;
            let size = f.metadata()?.len();
            let mut head = Vec::with_capacity(names::SNIFF_LEN);
            f.take(names::SNIFF_LEN as u64).read_to_end(&mut head)?;
            Ok((head, size))
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        let (head, size) = head;
        self.make_thumbnail(room, hex, &names::sniff(&head), size)
            .await;
        self.thumbnail(room, hex)
    }

    /// Makes the thumbnail of `room`'s stored file `hex` if it is an image
    /// within the limit ([`thumbs::make`], on a blocking thread); true when
    /// one exists. A failure to write it is logged: the file is shared without.
    pub(crate) async fn make_thumbnail(
        &self,
        room: &str,
        hex: &str,
        mime: &str,
        size: u64,
    ) -> bool {
        let (files, hex2, mime2) = (self.files_dir(room), hex.to_string(), mime.to_string());
        let max = self.limits.thumbnail_max_bytes;
        // Each decode may take up to 256 MiB: at most two at once on the server.
        let _slot = THUMBNAIL_SLOTS.acquire().await;
        let made =
            tokio::task::spawn_blocking(move || thumbs::make(&files, &hex2, &mime2, size, max))
                .await;
        match made {
            Ok(Ok(made)) => made,
            Ok(Err(e)) => {
                tracing::warn!(room, blake3 = hex, "files: cannot write a thumbnail: {e}");
                false
            }
            Err(e) => {
                tracing::warn!(room, blake3 = hex, "files: thumbnail task failed: {e}");
                false
            }
        }
    }

    /// `<root>/<room>/files`.
    fn files_dir(&self, room: &str) -> PathBuf {
        self.root.join(room).join(FILES_DIR)
    }

    /// The stored file of `room` with BLAKE3 `hex` (64 lowercase hex digits), if any.
    pub fn stored(&self, room: &str, hex: &str) -> Result<PathBuf, FileError> {
        let hex_ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hex_ok || !crate::chat::protocol::valid_room(room) {
            return Err(FileError::NotFound);
        }
        let path = self.files_dir(room).join(hex);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(path),
            _ => Err(FileError::NotFound),
        }
    }

    /// Starts an upload of `name` (`size` bytes) by `user` into `room`
    /// after checking the room policy, the name, the size limit, the room's
    /// quota (with the uploads in progress), the free space and the user's
    /// daily quota (charged here); creates its empty part file. Unfinished
    /// uploads past the resume window are removed first.
    pub fn create(
        &self,
        room: &str,
        user: &str,
        name: &str,
        size: u64,
    ) -> Result<Arc<Upload>, FileError> {
        self.check_room(room)?;
        names::check_name(name)?;
        self.check_size(size)?;
        self.expire();
        let dir = self.files_dir(room);
        std::fs::create_dir_all(dir.join(PARTIAL_DIR))?;
        let mut uploads = lock(&self.uploads);
        if uploads.len() >= MAX_UPLOADS {
            return Err(FileError::Busy);
        }
        self.check_free(&uploads, &dir, size, None)?;
        self.check_quota(&uploads, room, size)?;
        self.charge(user, size)?;
        let id = format!("{:032x}", rand::random::<u128>());
        let part = match upload::Part::create(dir.join(PARTIAL_DIR).join(&id)) {
            Ok(p) => p,
            Err(e) => {
                self.refund(user, size);
                return Err(e.into());
            }
        };
        let up = Arc::new(Upload {
            id: id.clone(),
            room: room.to_string(),
            user: user.to_string(),
            name: name.to_string(),
            size,
            offset: AtomicU64::new(0),
            part: tokio::sync::Mutex::new(part),
            touched: Mutex::new(Instant::now()),
        });
        uploads.insert(id, up.clone());
        Ok(up)
    }

    /// Refuses a room that does not take files (`--file-rooms`).
    pub fn check_room(&self, room: &str) -> Result<(), FileError> {
        match &self.limits.rooms {
            Some(rooms) if !rooms.iter().any(|r| r == room) => {
                Err(FileError::RoomClosed(room.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Charges `size` bytes to `user`'s quota of today, or refuses.
    fn charge(&self, user: &str, size: u64) -> Result<(), FileError> {
        let today = crate::chat::protocol::now_ms().div_euclid(86_400_000);
        let mut daily = lock(&self.daily);
        let entry = daily.entry(user.to_string()).or_insert((today, 0));
        if entry.0 != today {
            *entry = (today, 0);
        }
        if entry.1.saturating_add(size) > self.limits.user_daily_quota {
            return Err(FileError::OverUserQuota {
                user: user.to_string(),
                used: entry.1,
                size,
                quota: self.limits.user_daily_quota,
            });
        }
        entry.1 += size;
        Ok(())
    }

    /// Gives back `size` bytes of `user`'s quota (an upload that did not finish).
    fn refund(&self, user: &str, size: u64) {
        if let Some(e) = lock(&self.daily).get_mut(user) {
            e.1 = e.1.saturating_sub(size);
        }
    }

    /// Refuses a file over `--file-max-size`.
    fn check_size(&self, size: u64) -> Result<(), FileError> {
        if size > self.limits.max_size {
            return Err(FileError::TooLarge {
                size,
                max: self.limits.max_size,
            });
        }
        Ok(())
    }

    /// Refuses `size` more bytes in `room` when its files and its uploads
    /// in progress (`uploads`, the locked table) would pass its quota.
    fn check_quota(
        &self,
        uploads: &HashMap<String, Arc<Upload>>,
        room: &str,
        size: u64,
    ) -> Result<(), FileError> {
        let used = self.used_bytes(room)?;
        let reserved: u64 = uploads
            .values()
            .filter(|u| u.room == room)
            .map(|u| u.size)
            .sum();
        if used.saturating_add(reserved).saturating_add(size) > self.limits.room_quota {
            return Err(FileError::OverQuota {
                room: room.to_string(),
                used,
                reserved,
                size,
                quota: self.limits.room_quota,
            });
        }
        Ok(())
    }

    /// Takes a complete, durable file received elsewhere (the drop) into
    /// `room` under the same rules as an upload: room, name, size, quota.
    /// `path` is moved into the store (or removed if identical content is there).
    pub async fn adopt(
        &self,
        room: &str,
        user: &str,
        name: &str,
        path: &Path,
        size: u64,
        hash: blake3::Hash,
    ) -> Result<StoredFile, FileError> {
        self.check_room(room)?;
        names::check_name(name)?;
        self.check_size(size)?;
        self.check_quota(&lock(&self.uploads), room, size)?;
        self.charge(user, size)?;
        let head = {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
                use std::io::Read;
                let mut head = Vec::with_capacity(names::SNIFF_LEN);
                std::fs::File::open(path)?
                    .take(names::SNIFF_LEN as u64)
                    .read_to_end(&mut head)?;
                Ok(head)
            })
            .await
            .map_err(|e| io::Error::other(e.to_string()))??
        };
        let hex = hash.to_hex().to_string();
        std::fs::create_dir_all(self.files_dir(room))?;
        let deduplicated = self.commit(room, path, &hex, size)?;
        let mime = names::sniff(&head);
        let thumb = self.make_thumbnail(room, &hex, &mime, size).await;
        Ok(StoredFile {
            room: room.to_string(),
            name: name.to_string(),
            size,
            blake3: hex,
            mime,
            deduplicated,
            thumb,
        })
    }

    /// `<root>/<room>/files/.drop`: where the drop receives a room's files
    /// (partial files stay there for a resume).
    pub fn drop_dir(&self, room: &str) -> PathBuf {
        self.files_dir(room).join(DROP_DIR)
    }

    /// The upload `id` of `room`.
    pub fn upload(&self, room: &str, id: &str) -> Result<Arc<Upload>, FileError> {
        self.expire();
        lock(&self.uploads)
            .get(id)
            .filter(|u| u.room == room)
            .cloned()
            .ok_or_else(|| FileError::NoSuchUpload(id.chars().take(40).collect()))
    }

    /// Cancels `up`: forgets it and removes its part file.
    pub fn cancel(&self, up: &Upload) {
        if lock(&self.uploads).remove(&up.id).is_some() {
            let _ = std::fs::remove_file(self.part_path(up));
            self.refund(&up.user, up.size);
        }
    }

    fn part_path(&self, up: &Upload) -> PathBuf {
        self.files_dir(&up.room).join(PARTIAL_DIR).join(&up.id)
    }

    /// Refuses when writing `more` bytes under `dir` would leave less than
    /// `--file-min-free`, counting the bytes the other uploads in progress
    /// (all but `own`) are still to write: space promised to one upload is
    /// not promised again, so two that fit one at a time are not both let
    /// in to run the disk full halfway.
    fn check_free(
        &self,
        uploads: &HashMap<String, Arc<Upload>>,
        dir: &Path,
        more: u64,
        own: Option<&str>,
    ) -> Result<(), FileError> {
        let free = crate::transfer::disk::free_space(dir)?;
        let promised: u64 = uploads
            .values()
            .filter(|u| Some(u.id.as_str()) != own)
            .map(|u| u.size.saturating_sub(u.offset()))
            .sum();
        let need = more
            .saturating_add(promised)
            .saturating_add(self.limits.min_free);
        if free < need {
            return Err(FileError::DiskFull { free, need });
        }
        Ok(())
    }

    /// Bytes stored in `room` (counted from its folder on first use).
    fn used_bytes(&self, room: &str) -> io::Result<u64> {
        let mut used = lock(&self.used);
        if let Some(&n) = used.get(room) {
            return Ok(n);
        }
        let mut n = 0u64;
        if let Ok(entries) = std::fs::read_dir(self.files_dir(room)) {
            for e in entries {
                let m = e?.metadata()?;
                if m.is_file() {
                    n = n.saturating_add(m.len());
                }
            }
        }
        used.insert(room.to_string(), n);
        Ok(n)
    }

    /// Removes the uploads untouched for the resume window (never one a request holds).
    fn expire(&self) {
        let window = self.limits.resume_window;
        let stale: Vec<Arc<Upload>> = lock(&self.uploads)
            .values()
            .filter(|u| lock(&u.touched).elapsed() > window && u.part.try_lock().is_ok())
            .cloned()
            .collect();
        for up in stale {
            tracing::info!(room = %up.room, id = %up.id, "files: unfinished upload expired");
            self.cancel(&up);
        }
    }
}
