//! Thumbnails of images shared into rooms: made on the server with the
//! `image` crate from the stored file (never the original shown inline),
//! bounded (size, dimensions and decoder memory, so a decompression bomb is
//! refused rather than decoded), written durably as PNG under
//! `files/thumbs/<blake3>.png` before the file's message is posted, shared
//! by identical uploads, and removed with their file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use image::{ImageFormat, ImageReader, Limits};

/// Longest side of a thumbnail, in pixels.
pub const THUMB_SIDE: u32 = 320;

/// The folder of a room's thumbnails, inside its files folder.
pub const THUMBS_DIR: &str = "thumbs";

/// Largest width or height of an image decoded for a thumbnail.
const MAX_SIDE: u32 = 16_384;

/// Most memory the decoder may take for one image.
const MAX_DECODE_BYTES: u64 = 256 << 20;

/// Media types (as sniffed on the server) that get a thumbnail.
const IMAGE_TYPES: [(&str, ImageFormat); 4] = [
    ("image/png", ImageFormat::Png),
    ("image/jpeg", ImageFormat::Jpeg),
    ("image/gif", ImageFormat::Gif),
    ("image/webp", ImageFormat::WebP),
];

/// The thumbnail of content `hex` in a room's files folder `files`.
pub fn path(files: &Path, hex: &str) -> PathBuf {
    files.join(THUMBS_DIR).join(format!("{hex}.png"))
}

/// Makes the thumbnail of the stored file `files/hex` (media type `mime`,
/// `size` bytes) unless it exists, it is no image this server decodes, or it
/// is over `max_bytes` (0: thumbnails are off). True when a thumbnail is
/// there afterwards. An image that fails to decode (truncated, garbage,
/// over the limits) gets none, with a log line; only a failure to write the
/// thumbnail is an error. Blocking.
pub fn make(files: &Path, hex: &str, mime: &str, size: u64, max_bytes: u64) -> io::Result<bool> {
    let Some(format) = IMAGE_TYPES
        .iter()
        .find(|(m, _)| *m == mime)
        .map(|(_, f)| *f)
    else {
        return Ok(false);
    };
    if max_bytes == 0 || size > max_bytes {
        return Ok(false);
    }
    let dest = path(files, hex);
    if dest.is_file() {
        return Ok(true);
    }
    let thumb = match decode(&files.join(hex), format) {
        // Smaller images keep their size (re-encoded all the same).
        Ok(img) if img.width() <= THUMB_SIDE && img.height() <= THUMB_SIDE => img,
        Ok(img) => img.thumbnail(THUMB_SIDE, THUMB_SIDE),
        Err(e) => {
            tracing::info!(blake3 = hex, mime, "files: no thumbnail: {e}");
            return Ok(false);
        }
    };
    let dir = files.join(THUMBS_DIR);
    std::fs::create_dir_all(&dir)?;
    let part = dir.join(format!("{hex}.png.part"));
    let written = (|| {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)?;
        let mut w = BufWriter::new(f);
        thumb
            .write_to(&mut w, ImageFormat::Png)
            .map_err(io::Error::other)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        std::fs::rename(&part, &dest)?;
        File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    written.map(|()| true)
}

/// Decodes `file` as `format` within the limits.
fn decode(file: &Path, format: ImageFormat) -> image::ImageResult<image::DynamicImage> {
    let mut reader = ImageReader::with_format(BufReader::new(File::open(file)?), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    reader.decode()
}

/// Removes the thumbnail of `hex`, if any.
pub fn remove(files: &Path, hex: &str) -> io::Result<()> {
    match std::fs::remove_file(path(files, hex)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
