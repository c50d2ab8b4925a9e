//! The mask VQ-VAE decoder: 16 `<segNNN>` codes → a 64×64 raw float mask.
//!
//! PaliGemma segments by emitting a box and 16 codes of the VQ-VAE shipped by big_vision as
//! `vae-oid.npz` (the AiT mask VAE: a 128-entry codebook of 512-d vectors). The file is a
//! PyTorch state_dict saved with NumPy: flat keys (`decoder.4.weight`), PyTorch layouts (conv
//! OIHW, transposed conv `[in, out, kh, kw]`), f32. Only the decoder and the codebook are read.
//!
//! The decoder (big_vision `evaluators/proj/paligemma/transfers/segmentation.py`):
//!
//! ```text
//! z  = codebook[codes] as a 4×4 grid (code k at row k / 4, column k % 4), 512 channels
//! z  = relu(conv1x1(z, decoder.0))                              512 → 128
//! z += conv1x1(relu(conv3x3(relu(conv3x3(z))))), for decoder.2 and decoder.3 (no relu after)
//! z  = relu(conv_transpose(z)), decoder.4/6/8/10: k4 s2 p1,   4→8→16→32→64 px, 128→128→64→32→16
//! m  = conv1x1(z, decoder.12)                                   16 → 1, not clamped
//! ```
//!
//! big_vision runs it in flax as `ConvTranspose(padding=2, transpose_kernel=True)` on
//! `W.transpose(2, 3, 1, 0)`, which is the same operator as PyTorch's
//! `ConvTranspose2d(k=4, stride=2, padding=1)` with `W` as stored (the fixture generator checks
//! the two formulations against each other); candle's `conv_transpose2d` takes PyTorch's layout.

use crate::npz::{NpzArchive, NpzError};
use candle_core::{D, DType, Device, Tensor};
use std::path::Path;

/// Codebook entries: codes are `0..NUM_CODES` (`<seg000>`..`<seg127>`).
pub const NUM_CODES: usize = 128;
/// Codes per mask (a 4×4 grid).
pub const CODES_PER_MASK: usize = 16;
/// Side of a decoded mask in pixels.
pub const MASK_SIDE: usize = 64;
/// Pixels of a decoded mask (row-major).
pub const MASK_PIXELS: usize = MASK_SIDE * MASK_SIDE;

const CODEBOOK_DIM: usize = 512;
const HIDDEN: usize = 128;
const CODEBOOK: &str = "_vq_vae._embedding";
const RES_BLOCKS: [&str; 2] = ["decoder.2.net", "decoder.3.net"];
/// The transposed convolutions, each doubling the side: (name, in channels, out channels).
const UPSAMPLERS: [(&str, usize, usize); 4] = [
    ("decoder.4", 128, 128),
    ("decoder.6", 128, 64),
    ("decoder.8", 64, 32),
    ("decoder.10", 32, 16),
];

#[derive(Debug, thiserror::Error)]
pub enum VqVaeError {
    #[error("mask VAE: {0}")]
    Npz(#[from] NpzError),
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        path: String,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("mask {mask}: code {position} is {code}, but mask codes run 0..=127")]
    CodeOutOfRange {
        mask: usize,
        position: usize,
        code: u32,
    },
    #[error("mask VAE decoder: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A convolution (plain or transposed): weight in PyTorch layout, bias shaped `[1, C, 1, 1]`.
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
}

#[derive(Debug, Clone)]
struct ResBlock {
    conv3a: Conv,
    conv3b: Conv,
    conv1: Conv,
}

/// The decoder half of `vae-oid.npz`, ready to run on the CPU.
#[derive(Debug, Clone)]
pub struct VqVaeDecoder {
    /// `[128, 512]`.
    codebook: Tensor,
    input: Conv,
    res_blocks: [ResBlock; 2],
    upsamplers: [Conv; 4],
    output: Conv,
}

/// Reads arrays from one archive, checking each shape and naming the file in errors.
struct Loader<'a> {
    archive: &'a NpzArchive,
    path: String,
    device: &'a Device,
}

impl Loader<'_> {
    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Tensor, VqVaeError> {
        let array = self.archive.array(name)?;
        if array.shape() != expected {
            return Err(VqVaeError::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                found: array.shape().to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(Tensor::from_vec(array.to_f32_vec(), expected, self.device)?)
    }

    /// `name.weight` of shape `weight_shape` and `name.bias` of length `bias_len`.
    fn conv(
        &self,
        name: &str,
        weight_shape: [usize; 4],
        bias_len: usize,
    ) -> Result<Conv, VqVaeError> {
        let weight = self.tensor(&format!("{name}.weight"), &weight_shape)?;
        let bias = self
            .tensor(&format!("{name}.bias"), &[bias_len])?
            .reshape((1, bias_len, 1, 1))?;
        Ok(Conv { weight, bias })
    }

    fn res_block(&self, prefix: &str) -> Result<ResBlock, VqVaeError> {
        Ok(ResBlock {
            conv3a: self.conv(&format!("{prefix}.0"), [HIDDEN, HIDDEN, 3, 3], HIDDEN)?,
            conv3b: self.conv(&format!("{prefix}.2"), [HIDDEN, HIDDEN, 3, 3], HIDDEN)?,
            conv1: self.conv(&format!("{prefix}.4"), [HIDDEN, HIDDEN, 1, 1], HIDDEN)?,
        })
    }
}

impl VqVaeDecoder {
    /// Loads the codebook and decoder from a `vae-oid.npz`-style archive; every other member
    /// (the encoder, EMA statistics) is ignored. Fails on a missing tensor or a wrong shape.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, VqVaeError> {
        let path = path.as_ref();
        let archive = NpzArchive::open(path)?;
        let loader = Loader {
            archive: &archive,
            path: path.display().to_string(),
            device: &Device::Cpu,
        };
        let upsampler = |i: usize| {
            let (name, cin, cout) = UPSAMPLERS[i];
            // Transposed convolutions store `[in, out, kh, kw]`.
            loader.conv(name, [cin, cout, 4, 4], cout)
        };
        Ok(Self {
            codebook: loader.tensor(CODEBOOK, &[NUM_CODES, CODEBOOK_DIM])?,
            input: loader.conv("decoder.0", [HIDDEN, CODEBOOK_DIM, 1, 1], HIDDEN)?,
            res_blocks: [
                loader.res_block(RES_BLOCKS[0])?,
                loader.res_block(RES_BLOCKS[1])?,
            ],
            upsamplers: [upsampler(0)?, upsampler(1)?, upsampler(2)?, upsampler(3)?],
            output: loader.conv("decoder.12", [1, UPSAMPLERS[3].2, 1, 1], 1)?,
        })
    }

    /// Decodes a batch of 16-code sequences (code k at row k / 4, column k % 4 of the 4×4
    /// grid) into raw 64×64 masks, row-major. Values are the decoder's unclamped output,
    /// roughly in [-1, 1]; big_vision thresholds them at 0 after pasting
    /// ([`paste_mask`](crate::mask::paste_mask)).
    pub fn decode(
        &self,
        codes: &[[u8; CODES_PER_MASK]],
    ) -> Result<Vec<[f32; MASK_PIXELS]>, VqVaeError> {
        if codes.is_empty() {
            return Ok(Vec::new());
        }
        let indices = flat_indices(codes)?;
        let batch = codes.len();
        let device = self.codebook.device();
        let indices = Tensor::from_vec(indices, batch * CODES_PER_MASK, device)?;
        // [B·16, 512] → [B, 4, 4, 512] → NCHW.
        let z = self
            .codebook
            .index_select(&indices, 0)?
            .reshape((batch, 4, 4, CODEBOOK_DIM))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let out = self.forward(&z)?;
        let flat = out.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(flat
            .chunks_exact(MASK_PIXELS)
            .map(|c| {
                let mut mask = [0f32; MASK_PIXELS];
                mask.copy_from_slice(c);
                mask
            })
            .collect())
    }

    /// `[B, 512, 4, 4]` → `[B, 1, 64, 64]`.
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = conv2d(z, &self.input, 0)?.relu()?;
        for block in &self.res_blocks {
            let r = conv2d(&x, &block.conv3a, 1)?.relu()?;
            let r = conv2d(&r, &block.conv3b, 1)?.relu()?;
            x = (x + conv2d(&r, &block.conv1, 0)?)?;
        }
        for up in &self.upsamplers {
            x = conv_transpose_k4s2p1(&x, up)?.relu()?;
        }
        let out = conv2d(&x, &self.output, 0)?;
        debug_assert_eq!(out.dim(D::Minus1)?, MASK_SIDE);
        Ok(out)
    }
}

/// Checks every code and flattens them in mask order.
fn flat_indices(codes: &[[u8; CODES_PER_MASK]]) -> Result<Vec<u32>, VqVaeError> {
    let mut out = Vec::with_capacity(codes.len() * CODES_PER_MASK);
    for (mask, seq) in codes.iter().enumerate() {
        for (position, &code) in seq.iter().enumerate() {
            if usize::from(code) >= NUM_CODES {
                return Err(VqVaeError::CodeOutOfRange {
                    mask,
                    position,
                    code: u32::from(code),
                });
            }
            out.push(u32::from(code));
        }
    }
    Ok(out)
}

/// Stride-1 cross-correlation with zero padding `pad`, plus bias.
fn conv2d(x: &Tensor, conv: &Conv, pad: usize) -> candle_core::Result<Tensor> {
    x.conv2d(&conv.weight, pad, 1, 1, 1)?
        .broadcast_add(&conv.bias)
}

/// PyTorch `ConvTranspose2d(kernel 4, stride 2, padding 1)`: doubles height and width.
fn conv_transpose_k4s2p1(x: &Tensor, conv: &Conv) -> candle_core::Result<Tensor> {
    x.conv_transpose2d(&conv.weight, 1, 0, 2, 1)?
        .broadcast_add(&conv.bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_range_checked_with_their_position() {
        let mut codes = [[0u8; 16]; 2];
        codes[1][5] = 128;
        match flat_indices(&codes) {
            Err(VqVaeError::CodeOutOfRange {
                mask: 1,
                position: 5,
                code: 128,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        codes[1][5] = 127;
        assert_eq!(flat_indices(&codes).unwrap()[16 + 5], 127);
    }

    /// A 1-channel transposed conv checked against the scatter definition
    /// `out[2·iy − 1 + ky, 2·ix − 1 + kx] += in[iy, ix] · w[ky, kx]`.
    #[test]
    fn conv_transpose_matches_the_scatter_definition() {
        let input: Vec<f32> = (0..9).map(|v| v as f32 - 3.5).collect();
        let kernel: Vec<f32> = (0..16).map(|v| (v as f32 * 0.37).sin()).collect();
        let conv = Conv {
            weight: Tensor::from_vec(kernel.clone(), (1, 1, 4, 4), &Device::Cpu).unwrap(),
            bias: Tensor::from_vec(vec![0.25f32], (1, 1, 1, 1), &Device::Cpu).unwrap(),
        };
        let x = Tensor::from_vec(input.clone(), (1, 1, 3, 3), &Device::Cpu).unwrap();
        let got = conv_transpose_k4s2p1(&x, &conv)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut want = vec![0.25f32; 36];
        for iy in 0..3i32 {
            for ix in 0..3i32 {
                for ky in 0..4i32 {
                    for kx in 0..4i32 {
                        let (oy, ox) = (2 * iy - 1 + ky, 2 * ix - 1 + kx);
                        if (0..6).contains(&oy) && (0..6).contains(&ox) {
                            want[(oy * 6 + ox) as usize] +=
                                input[(iy * 3 + ix) as usize] * kernel[(ky * 4 + kx) as usize];
                        }
                    }
                }
            }
        }
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }
}
