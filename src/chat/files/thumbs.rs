//! Thumbnails of images shared into rooms: made on the server with the
//! `image` crate from the stored file (never the original shown inline),
//! bounded (size, dimensions and decoder memory, so a decompression bomb is
//! refused rather than decoded), written durably as PNG under
//! `files/thumbs/<blake3>.png` before the file's message is posted, shared
//! by identical uploads, and removed with their file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

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

/// Decodes `file` as `format` within the limits, turned upright by its EXIF
/// orientation (a phone's portrait photo is stored sideways with a tag
/// saying so; browsers show it upright, so its thumbnail must be too).
fn decode(file: &Path, format: ImageFormat) -> image::ImageResult<DynamicImage> {
    let mut reader = ImageReader::with_format(BufReader::new(File::open(file)?), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder()?;
    // An unreadable orientation tag is no reason to refuse the picture.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    // The decoders check the sides; the buffer the image is decoded into is
    // reserved here (as `ImageReader::decode` does), twice when turning it
    // upright makes a copy.
    limits.reserve(decoder.total_bytes())?;
    if !matches!(
        orientation,
        Orientation::NoTransforms | Orientation::FlipHorizontal | Orientation::FlipVertical
    ) {
        limits.reserve(decoder.total_bytes())?;
    }
    decoder.set_limits(limits)?;
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Removes the part files of thumbnails a stopped run was writing in the
/// files folder `files` (a thumbnail is renamed into place only whole).
pub fn remove_parts(files: &Path) -> io::Result<()> {
    let dir = match std::fs::read_dir(files.join(THUMBS_DIR)) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in dir {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "part") {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Removes the thumbnail of `hex`, if any.
pub fn remove(files: &Path, hex: &str) -> io::Result<()> {
    match std::fs::remove_file(path(files, hex)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, RgbImage};

    /// A `w`×`h` JPEG, red in its top-left quarter, carrying an EXIF
    /// orientation tag of `orientation` (1–8) when given.
    fn jpeg(w: u32, h: u32, orientation: Option<u16>) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            if x < w / 2 && y < h / 2 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
            .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
            .unwrap();
        let Some(o) = orientation else { return out };
        // APP1 "Exif": a big-endian TIFF header and one IFD entry, 0x0112
        // (Orientation), type SHORT, count 1, the value.
        let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
        exif.extend_from_slice(&o.to_be_bytes());
        exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend_from_slice(&(exif.len() as u16 + 2).to_be_bytes());
        app1.extend_from_slice(&exif);
        // Right after the SOI marker.
        out.splice(2..2, app1);
        out
    }

    /// Makes the thumbnail of `data` as a JPEG; returns it decoded.
    fn thumb_of(data: &[u8]) -> image::RgbImage {
        let dir = tempfile::tempdir().unwrap();
        let hex = blake3::hash(data).to_hex().to_string();
        std::fs::write(dir.path().join(&hex), data).unwrap();
        let made = make(dir.path(), &hex, "image/jpeg", data.len() as u64, 1 << 20).unwrap();
        assert!(made);
        image::open(path(dir.path(), &hex)).unwrap().to_rgb8()
    }

    fn is_red(p: &image::Rgb<u8>) -> bool {
        p[0] > 200 && p[2] < 60
    }

    #[test]
    fn a_photo_tagged_as_turned_gets_an_upright_thumbnail() {
        // Untagged: as stored, 40×20, red top-left.
        let t = thumb_of(&jpeg(40, 20, None));
        assert_eq!(t.dimensions(), (40, 20));
        assert!(is_red(t.get_pixel(2, 2)));
        // Orientation 6 (turn 90° clockwise to view): 20×40, and the red
        // quarter, stored top-left, shows top-right.
        let t = thumb_of(&jpeg(40, 20, Some(6)));
        assert_eq!(t.dimensions(), (20, 40));
        assert!(is_red(t.get_pixel(17, 2)), "{:?}", t.get_pixel(17, 2));
        assert!(!is_red(t.get_pixel(2, 2)));
        // Orientation 3 (turn 180°): red shows bottom-right.
        let t = thumb_of(&jpeg(40, 20, Some(3)));
        assert_eq!(t.dimensions(), (40, 20));
        assert!(is_red(t.get_pixel(37, 17)));
        // A tag with a value out of range is ignored, not an error.
        let t = thumb_of(&jpeg(40, 20, Some(42)));
        assert_eq!(t.dimensions(), (40, 20));
    }

    #[test]
    fn a_thumbnail_part_a_stopped_run_left_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let thumbs = dir.path().join(THUMBS_DIR);
        std::fs::create_dir_all(&thumbs).unwrap();
        std::fs::write(thumbs.join("ab.png.part"), b"half").unwrap();
        std::fs::write(thumbs.join("ab.png"), b"whole").unwrap();
        remove_parts(dir.path()).unwrap();
        assert!(!thumbs.join("ab.png.part").exists());
        assert!(thumbs.join("ab.png").exists());
        // No thumbs folder at all is fine.
        remove_parts(&dir.path().join("nothing")).unwrap();
    }
}
