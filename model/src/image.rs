//! Images for MiniMax-VL-01: decoding (PNG, JPEG), the reference processor's bicubic resize
//! (Pillow's, bit for bit: separable convolution with the Keys cubic, a = −0.5, its support
//! widened when downscaling, 22-bit fixed-point coefficients, rounding to 8 bits after each
//! pass), and the any-resolution cropping of the released processor: the base image resized to
//! one tile, then the image resized into the best grid resolution keeping its aspect ratio
//! (floor rounding), pasted centred on black, cut into tiles row-major; every crop scaled to
//! [0, 1] and normalized with the CLIP mean and deviation.

use crate::error::{ModelError, Result};
use crate::vision::VisionConfig;

/// CLIP's per-channel mean and standard deviation (the processor's `image_mean`, `image_std`,
/// written as the processor writes them; f32 rounds them as torch does).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// The largest image accepted by default, in pixels (64 Mpx).
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 1 << 26;

/// The most bytes of image files one prompt may hold, all its images together (64 MiB): a
/// cluster's job step carries them to its attention worker in one message.
pub const MAX_IMAGE_BYTES: usize = 64 << 20;

/// An 8-bit RGB image, row-major, 3 bytes a pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Why an image is refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not a PNG or JPEG image ({0})")]
    Decode(String),
    #[error("an image of {width} × {height} pixels has no pixels")]
    Empty { width: usize, height: usize },
    #[error("an image of {width} × {height} pixels is above the limit of {limit} pixels")]
    TooLarge {
        width: usize,
        height: usize,
        limit: u64,
    },
}

impl From<ImageError> for ModelError {
    fn from(e: ImageError) -> Self {
        ModelError::Invalid(e.to_string())
    }
}

impl Rgb {
    /// Decodes a PNG or JPEG image to RGB (an alpha channel is dropped, as the released
    /// processor's conversion does). Images with more than `max_pixels` pixels are refused
    /// before their pixels are decoded.
    pub fn decode(bytes: &[u8], max_pixels: u64) -> std::result::Result<Self, ImageError> {
        let format = image::guess_format(bytes).map_err(|e| ImageError::Decode(e.to_string()))?;
        if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
            return Err(ImageError::Decode(format!("{format:?}")));
        }
        // One reader for the header, one for the pixels, both under the same allocation limit.
        let reader = || {
            let mut r = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
            let mut limits = image::Limits::default();
            limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
            r.limits(limits);
            r
        };
        let (w, h) = reader()
            .into_dimensions()
            .map_err(|e| ImageError::Decode(e.to_string()))?;
        let (width, height) = (w as usize, h as usize);
        if width == 0 || height == 0 {
            return Err(ImageError::Empty { width, height });
        }
        if (width as u64) * (height as u64) > max_pixels {
            return Err(ImageError::TooLarge {
                width,
                height,
                limit: max_pixels,
            });
        }
        let img = reader()
            .decode()
            .map_err(|e| ImageError::Decode(e.to_string()))?;
        Ok(Rgb {
            width,
            height,
            data: img.to_rgb8().into_raw(),
        })
    }

    /// A `width × height` image of one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        Rgb {
            width,
            height,
            data: rgb.repeat(width * height),
        }
    }

    /// Resized to `width × height` with Pillow's bicubic filter (`Image.resize(…, BICUBIC)`,
    /// Pillow 13): two passes, each rounded to 8 bits; horizontal first unless the height
    /// shrinks by more than twice as many pixels as the width does.
    pub fn resize(&self, width: usize, height: usize) -> Rgb {
        let (dw, dh) = (
            self.width as i64 - width as i64,
            self.height as i64 - height as i64,
        );
        let vertical_first = dh > 0 && dh > dw * 2;
        let mut img = self.clone();
        for horizontal in if vertical_first {
            [false, true]
        } else {
            [true, false]
        } {
            let (from, to) = if horizontal {
                (self.width, width)
            } else {
                (self.height, height)
            };
            if from != to {
                img = pass(&img, to, horizontal);
            }
        }
        img
    }

    /// `src` copied in with its top-left corner at (`x`, `y`) (clipped to this image).
    pub fn paste(&mut self, src: &Rgb, x: usize, y: usize) {
        for r in 0..src.height.min(self.height.saturating_sub(y)) {
            let n = src.width.min(self.width.saturating_sub(x)) * 3;
            let d = ((y + r) * self.width + x) * 3;
            self.data[d..d + n].copy_from_slice(&src.data[r * src.width * 3..][..n]);
        }
    }

    /// The `size × size` square at (`x`, `y`).
    pub fn crop(&self, x: usize, y: usize, size: usize) -> Rgb {
        let mut out = Rgb::filled(size, size, [0; 3]);
        for r in 0..size {
            let s = ((y + r) * self.width + x) * 3;
            out.data[r * size * 3..][..size * 3].copy_from_slice(&self.data[s..s + size * 3]);
        }
        out
    }

    /// Channel-major f32 pixels (`[3, h, w]`) scaled to [0, 1] and normalized.
    pub fn normalized(&self, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
        let n = self.width * self.height;
        let mut out = vec![0f32; 3 * n];
        for (i, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * n + i] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        out
    }
}

/// Pillow's fixed-point precision for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The Keys cubic with a = −0.5 (Pillow's `bicubic_filter`).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc`: for each output pixel, the first
/// input pixel and the fixed-point weights of the ones it reads.
fn coefficients(in_size: usize, out_size: usize) -> (usize, Vec<(usize, usize)>, Vec<i32>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            *kx = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *kx;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let f = w * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if w < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    (ksize, bounds, kk)
}

/// A rounded 8-bit value from a fixed-point sum (Pillow's `clip8`).
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One resampling pass along the width (`horizontal`) or the height.
fn pass(img: &Rgb, out: usize, horizontal: bool) -> Rgb {
    let (in_size, (w, h)) = if horizontal {
        (img.width, (out, img.height))
    } else {
        (img.height, (img.width, out))
    };
    let (ksize, bounds, kk) = coefficients(in_size, out);
    let mut dst = Rgb::filled(w, h, [0; 3]);
    for y in 0..h {
        for x in 0..w {
            let o = if horizontal { x } else { y };
            let (min, n) = bounds[o];
            let k = &kk[o * ksize..][..n];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (i, &kv) in k.iter().enumerate() {
                let s = if horizontal {
                    (y * img.width + min + i) * 3
                } else {
                    ((min + i) * img.width + x) * 3
                };
                for c in 0..3 {
                    ss[c] += img.data[s + c] as i32 * kv;
                }
            }
            let d = (y * w + x) * 3;
            for c in 0..3 {
                dst.data[d + c] = clip8(ss[c]);
            }
        }
    }
    dst
}

/// The crops the released processor cuts an image into, as normalized pixels (`[crops, 3, S,
/// S]`): the whole image resized to one tile, then the tiles of the image fitted into its best
/// grid resolution.
pub fn crops(img: &Rgb, cfg: &VisionConfig) -> Result<Vec<f32>> {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 {
        return Err(ImageError::Empty {
            width: w,
            height: h,
        }
        .into());
    }
    let s = cfg.image_size;
    let (th, tw) = cfg.best_resolution(h, w);
    let mut canvas = Rgb::filled(tw, th, [0; 3]);
    if w * th > tw * h {
        let nh = tw * h / w;
        canvas.paste(&img.resize(tw, nh.max(1)), 0, (th - nh) / 2);
    } else {
        let nw = th * w / h;
        canvas.paste(&img.resize(nw.max(1), th), (tw - nw) / 2, 0);
    }
    let mut out = img.resize(s, s).normalized(CLIP_MEAN, CLIP_STD);
    for y in (0..th).step_by(s) {
        for x in (0..tw).step_by(s) {
            out.extend(canvas.crop(x, y, s).normalized(CLIP_MEAN, CLIP_STD));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizing_to_the_same_size_is_the_identity_and_a_flat_image_stays_flat() {
        let img = Rgb {
            width: 5,
            height: 3,
            data: (0..45).map(|v| (v * 5) as u8).collect(),
        };
        assert_eq!(img.resize(5, 3), img);
        let flat = Rgb::filled(7, 9, [10, 200, 255]);
        for (w, h) in [(3, 4), (20, 2), (7, 30)] {
            let r = flat.resize(w, h);
            assert_eq!((r.width, r.height), (w, h));
            assert!(r.data.chunks(3).all(|p| p == [10, 200, 255]), "{w}x{h}");
        }
    }

    #[test]
    fn bad_bytes_and_oversized_images_are_refused_with_reasons() {
        let e = Rgb::decode(b"not an image", 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a PNG or JPEG"), "{e}");
        let mut png = Vec::new();
        image::RgbImage::new(40, 30)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let e = Rgb::decode(&png, 1000).unwrap_err().to_string();
        assert!(e.contains("40 × 30") && e.contains("1000"), "{e}");
        let ok = Rgb::decode(&png, 1200).unwrap();
        assert_eq!((ok.width, ok.height, ok.data.len()), (40, 30, 3600));
        let e = Rgb::decode(&png[..png.len() / 2], 1200)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a PNG or JPEG"), "{e}");
    }
}
