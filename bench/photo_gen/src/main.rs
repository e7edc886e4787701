//! Writes a `W`x`H` JPEG of a photo's size and entropy (smooth gradients
//! under per-pixel noise, so it compresses like a camera picture, not like
//! a flat test card): `photo-gen WIDTH HEIGHT SEED OUT.jpg` (another seed,
//! another picture: identical uploads are stored, and thumbnailed, once).

use image::ImageEncoder;
use image::codecs::jpeg::JpegEncoder;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, w, h, seed, out] = args.as_slice() else {
        eprintln!("usage: photo-gen WIDTH HEIGHT SEED OUT.jpg");
        std::process::exit(2);
    };
    let (w, h): (u32, u32) = (w.parse().unwrap(), h.parse().unwrap());
    // xorshift noise: deterministic, no dependency.
    let mut x: u32 = 0x9E37_79B9 ^ seed.parse::<u32>().unwrap().wrapping_mul(0x85EB_CA6B) | 1;
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for i in 0..w {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let n = (x & 0x3F) as i32 - 32;
            let base = [
                (i * 255 / w) as i32,
                (y * 255 / h) as i32,
                ((i + y) * 127 / (w + h)) as i32 + 64,
            ];
            rgb.extend(base.iter().map(|b| (b + n).clamp(0, 255) as u8));
        }
    }
    let f = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    JpegEncoder::new_with_quality(f, 90)
        .write_image(&rgb, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
}
