//! Preallocated key/value cache: one `[B, kv_heads, capacity, head_dim]` pair per layer,
//! written in place, so a decode step copies only the new token's keys and values.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        dev: &Device,
    ) -> Result<Self> {
        let make = || Tensor::zeros((batch, kv_heads, capacity, head_dim), DType::F32, dev);
        let layers = (0..layers)
            .map(|_| Ok((make()?, make()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Slots already filled (the same for every layer between forward passes).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `k`, `v` `[B, kv_heads, L, head_dim]` after the filled slots of `layer` and
    /// returns the keys and values of all slots so far. [`KvCache::advance`] commits them.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        if self.len + new > self.capacity {
            candle_core::bail!(
                "KV cache full: {} slots used, {new} more needed, capacity {}",
                self.len,
                self.capacity
            )
        }
        let (ck, cv) = &self.layers[layer];
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        let total = self.len + new;
        Ok((
            ck.narrow(2, 0, total)?.contiguous()?,
            cv.narrow(2, 0, total)?.contiguous()?,
        ))
    }

    pub fn advance(&mut self, slots: usize) {
        self.len += slots;
    }

    /// Keeps, for each new row `i`, the cache of old row `parents[i]` (beam search).
    pub fn reorder(&mut self, parents: &[u32]) -> Result<()> {
        let Some((k0, _)) = self.layers.first() else {
            return Ok(());
        };
        let idx = Tensor::from_slice(parents, parents.len(), k0.device())?;
        for (k, v) in &mut self.layers {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }
}
