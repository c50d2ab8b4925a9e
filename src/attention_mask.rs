//! The prefix-LM attention mask.
//!
//! The prefix (image tokens, `<bos>`, prompt, `"\n"`) attends both ways within itself; every
//! later token (the suffix in training, generated tokens at inference) attends causally to
//! everything before it. Padding keys are never attended to. This is transformers 5.24's
//! `token_type_ids` mask and big_vision's `make_attn_mask`.

use candle_core::{Device, Result, Tensor};

/// Added to a disallowed score. The finite minimum (as transformers' eager mask) keeps fully
/// masked rows, such as padding queries, finite instead of NaN.
pub const MASKED: f32 = f32::MIN;

/// What the mask needs to know about one row's key slots (cached and new alike).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowLayout {
    /// `false` for padding slots.
    pub valid: Vec<bool>,
    /// `true` for slots in the bidirectional prefix block.
    pub prefix: Vec<bool>,
}

impl RowLayout {
    pub fn len(&self) -> usize {
        self.valid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.valid.is_empty()
    }

    pub fn push(&mut self, valid: bool, prefix: bool) {
        self.valid.push(valid);
        self.prefix.push(prefix);
    }

    /// Whether the token in slot `q` may attend to the token in slot `kv`.
    pub fn allowed(&self, q: usize, kv: usize) -> bool {
        self.valid[kv] && (kv <= q || (self.prefix[q] && self.prefix[kv]))
    }

    /// 1-indexed positions of the real tokens, as transformers numbers them (RoPE only sees
    /// differences, so the offset is immaterial beyond rounding); padding slots get 0.
    pub fn positions(&self) -> Vec<u32> {
        let mut seen = 0;
        self.valid
            .iter()
            .map(|&v| {
                if v {
                    seen += 1;
                    seen
                } else {
                    0
                }
            })
            .collect()
    }
}

/// The additive mask `[B, 1, queries, keys]` for queries in slots `start..start+queries` of
/// every row, against all `start + queries` key slots (0 = attend, [`MASKED`] = do not).
pub fn additive_mask(
    rows: &[RowLayout],
    start: usize,
    queries: usize,
    dev: &Device,
) -> Result<Tensor> {
    let keys = start + queries;
    let mut data = Vec::with_capacity(rows.len() * queries * keys);
    for row in rows {
        if row.len() < keys {
            candle_core::bail!("row layout has {} slots, the mask needs {keys}", row.len())
        }
        for q in start..keys {
            data.extend((0..keys).map(|kv| if row.allowed(q, kv) { 0.0 } else { MASKED }));
        }
    }
    Tensor::from_vec(data, (rows.len(), 1, queries, keys), dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(valid: &[u8], prefix: &[u8]) -> RowLayout {
        RowLayout {
            valid: valid.iter().map(|&v| v == 1).collect(),
            prefix: prefix.iter().map(|&v| v == 1).collect(),
        }
    }

    #[test]
    fn prefix_is_bidirectional_and_suffix_causal() {
        // pad, 3 prefix tokens, 2 suffix tokens
        let r = row(&[0, 1, 1, 1, 1, 1], &[0, 1, 1, 1, 0, 0]);
        let allowed: Vec<Vec<u8>> = (0..6)
            .map(|q| (0..6).map(|k| r.allowed(q, k) as u8).collect())
            .collect();
        assert_eq!(
            allowed,
            vec![
                vec![0, 0, 0, 0, 0, 0],
                vec![0, 1, 1, 1, 0, 0],
                vec![0, 1, 1, 1, 0, 0],
                vec![0, 1, 1, 1, 0, 0],
                vec![0, 1, 1, 1, 1, 0],
                vec![0, 1, 1, 1, 1, 1],
            ]
        );
        assert_eq!(r.positions(), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn decode_step_sees_every_earlier_real_token() {
        let r = row(&[0, 1, 1, 1], &[0, 1, 1, 0]);
        let m = additive_mask(&[r], 3, 1, &Device::Cpu).unwrap();
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![MASKED, 0.0, 0.0, 0.0]);
    }
}
