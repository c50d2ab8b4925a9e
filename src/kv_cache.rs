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

    /// Rows this cache holds.
    pub fn batch(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |(k, _)| k.dim(0).unwrap_or(0))
    }

    /// A copy laid out anew for a batch whose rows join and leave (continuous batching):
    /// the filled slots `skip..len` move behind `pad` empty slots, in a cache of `capacity`.
    pub fn relayout(&self, skip: usize, pad: usize, capacity: usize) -> Result<Self> {
        if skip > self.len {
            candle_core::bail!("cannot skip {skip} of {} filled slots", self.len)
        }
        let kept = self.len - skip;
        if pad + kept > capacity {
            candle_core::bail!("{pad} padding and {kept} filled slots exceed capacity {capacity}")
        }
        let move_slots = |t: &Tensor| -> Result<Tensor> {
            let (b, heads, _, dim) = t.dims4()?;
            let out = Tensor::zeros((b, heads, capacity, dim), t.dtype(), t.device())?;
            if kept > 0 {
                out.slice_set(&t.narrow(2, skip, kept)?.contiguous()?, 2, pad)?;
            }
            Ok(out)
        };
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((move_slots(k)?, move_slots(v)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: pad + kept,
            capacity,
        })
    }

    /// The rows of several caches, one after another; they must agree on filled slots and
    /// capacity (see [`KvCache::relayout`]).
    pub fn concat_rows(parts: &[&KvCache]) -> Result<Self> {
        let Some(first) = parts.first() else {
            candle_core::bail!("no caches to join")
        };
        if parts
            .iter()
            .any(|p| p.len != first.len || p.capacity != first.capacity)
        {
            candle_core::bail!("caches to join differ in filled slots or capacity")
        }
        let layers = (0..first.layers.len())
            .map(|i| {
                let ks: Vec<&Tensor> = parts.iter().map(|p| &p.layers[i].0).collect();
                let vs: Vec<&Tensor> = parts.iter().map(|p| &p.layers[i].1).collect();
                Ok((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: first.len,
            capacity: first.capacity,
        })
    }
}
