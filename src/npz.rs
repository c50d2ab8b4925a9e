//! NumPy `.npz` / `.npy` reading: big_vision checkpoints and the segmentation VAE
//! (`vae-oid.npz`).
//!
//! An `.npz` is a ZIP archive (ZIP64 beyond 4 GB) whose members are `.npy` files named after
//! the arrays. `np.savez` stores members uncompressed, so those are read straight from a memory
//! map of the archive; `np.savez_compressed` deflates them, and those are inflated on demand.
//! NumPy has no bfloat16, so bf16 arrays (big_vision, `ml_dtypes`) are written as 2-byte void
//! (`V2`): that is read as bf16.

use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zip::{CompressionMethod, ZipArchive};

#[derive(Debug, thiserror::Error)]
pub enum NpzError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a readable .npz (ZIP) archive (truncated, or not an .npz?): {reason}")]
    NotZip { path: String, reason: String },
    #[error("{path} has no array `{member}`")]
    Missing { path: String, member: String },
    #[error("{path}, array `{member}`: {reason}")]
    Member {
        path: String,
        member: String,
        reason: String,
    },
    #[error("{path}, array `{member}`: bad .npy header: {reason}")]
    Header {
        path: String,
        member: String,
        reason: String,
    },
    #[error("{path}, array `{member}`: unsupported dtype `{descr}`")]
    Dtype {
        path: String,
        member: String,
        descr: String,
    },
}

/// Element types of `.npy` arrays we understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    /// Stored as 2-byte void (`V2`), the way NumPy writes `ml_dtypes.bfloat16`.
    BF16,
    F32,
    F64,
}

impl NpyDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
        }
    }
}

/// Where an array's element bytes are.
#[derive(Clone)]
enum Data {
    /// A range of the memory-mapped archive (stored member).
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    /// Inflated or read bytes.
    Owned(Arc<Vec<u8>>),
}

/// One array: shape, dtype and its element bytes as stored.
#[derive(Clone)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub dtype: NpyDtype,
    /// Elements are in Fortran (column-major) order in `data`.
    pub fortran_order: bool,
    /// Elements are big-endian in `data`.
    big_endian: bool,
    data: Data,
}

impl std::fmt::Debug for NpyArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NpyArray")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("fortran_order", &self.fortran_order)
            .finish()
    }
}

/// The bytes of the archive, shared with the arrays borrowed from it.
#[derive(Clone)]
struct MapBytes(Arc<Mmap>);

impl AsRef<[u8]> for MapBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Where one member's (possibly compressed) bytes lie in the archive.
#[derive(Debug, Clone)]
struct MemberInfo {
    index: usize,
    data_start: usize,
    compressed_size: usize,
    size: usize,
    compression: CompressionMethod,
}

/// An open `.npz` archive; arrays are decoded on request.
pub struct NpzArchive {
    path: PathBuf,
    map: Arc<Mmap>,
    zip: ZipArchive<Cursor<MapBytes>>,
    /// Member name without `.npy` → where it lies, in archive order.
    members: Vec<(String, MemberInfo)>,
    by_name: HashMap<String, usize>,
}

impl NpzArchive {
    /// Opens and indexes an archive; no array data is read yet.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NpzError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let not_zip = |reason: String| NpzError::NotZip {
            path: shown.clone(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|source| NpzError::Open {
            path: shown.clone(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| NpzError::Open {
                path: shown.clone(),
                source,
            })?
            .len();
        if len == 0 {
            return Err(not_zip("the file is empty".into()));
        }
        // Safety: opened read-only; a concurrent writer is outside our control, as for every
        // memory-mapped loader.
        let map = Arc::new(
            unsafe { Mmap::map(&file) }.map_err(|source| NpzError::Open {
                path: shown.clone(),
                source,
            })?,
        );
        let mut zip = ZipArchive::new(Cursor::new(MapBytes(map.clone())))
            .map_err(|e| not_zip(e.to_string()))?;
        let mut members = Vec::with_capacity(zip.len());
        for index in 0..zip.len() {
            let (name, info) = member_info(&mut zip, index, map.len()).map_err(not_zip)?;
            if let Some(name) = name {
                members.push((name, info));
            }
        }
        let by_name = members
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            map,
            zip,
            members,
            by_name,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Array names (member names without `.npy`), in archive order.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Whether the archive holds an array of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Reads the header of array `name` and locates (or inflates) its data.
    pub fn array(&self, name: &str) -> Result<NpyArray, NpzError> {
        let shown = self.path.display().to_string();
        let info = self.info(name)?;
        let ctx = Ctx {
            path: &shown,
            member: name,
        };
        match info.compression {
            CompressionMethod::Stored => {
                let bytes = &self.map[info.data_start..info.data_start + info.size];
                let header = parse_npy_header(bytes, &ctx)?;
                let len = header.byte_len(&ctx)?;
                if header.data_offset + len > bytes.len() {
                    return Err(ctx.member(format!(
                        "truncated: {} data bytes stored, {len} expected",
                        bytes.len() - header.data_offset
                    )));
                }
                let start = info.data_start + header.data_offset;
                Ok(header.into_array(Data::Mapped {
                    map: self.map.clone(),
                    start,
                    len,
                }))
            }
            _ => {
                let bytes = self.inflate(info, &ctx)?;
                let header = parse_npy_header(&bytes, &ctx)?;
                let len = header.byte_len(&ctx)?;
                if header.data_offset + len > bytes.len() {
                    return Err(ctx.member(format!(
                        "truncated: {} data bytes stored, {len} expected",
                        bytes.len() - header.data_offset
                    )));
                }
                let data = bytes[header.data_offset..header.data_offset + len].to_vec();
                Ok(header.into_array(Data::Owned(Arc::new(data))))
            }
        }
    }

    /// Shape and dtype of array `name`, reading only its header (cheap even when the member
    /// is deflated: only the first bytes are inflated).
    pub fn header(&self, name: &str) -> Result<(Vec<usize>, NpyDtype), NpzError> {
        let shown = self.path.display().to_string();
        let info = self.info(name)?;
        let ctx = Ctx {
            path: &shown,
            member: name,
        };
        let header = match info.compression {
            CompressionMethod::Stored => parse_npy_header(
                &self.map[info.data_start..info.data_start + info.size],
                &ctx,
            )?,
            _ => {
                let mut zip = self.zip.clone();
                let file = zip
                    .by_index(info.index)
                    .map_err(|e| ctx.member(format!("cannot decompress: {e}")))?;
                // Magic, version and length first; then exactly the header they announce.
                let mut reader = file.take(12);
                let mut head = Vec::with_capacity(12);
                reader
                    .read_to_end(&mut head)
                    .map_err(|e| ctx.member(format!("cannot decompress: {e}")))?;
                let len = header_text_len(&head).unwrap_or(0);
                let mut file = reader.into_inner();
                file.by_ref()
                    .take(len as u64)
                    .read_to_end(&mut head)
                    .map_err(|e| ctx.member(format!("cannot decompress: {e}")))?;
                parse_npy_header(&head, &ctx)?
            }
        };
        Ok((header.shape, header.dtype))
    }

    fn info(&self, name: &str) -> Result<&MemberInfo, NpzError> {
        self.by_name
            .get(name)
            .map(|&i| &self.members[i].1)
            .ok_or_else(|| NpzError::Missing {
                path: self.path.display().to_string(),
                member: name.to_string(),
            })
    }

    /// Decompresses one member (deflate, or whatever the zip crate was built to read).
    fn inflate(&self, info: &MemberInfo, ctx: &Ctx) -> Result<Vec<u8>, NpzError> {
        // The archive handle is cheap to clone (shared index, shared map), which keeps
        // `array` usable through `&self`.
        let mut zip = self.zip.clone();
        let mut file = zip
            .by_index(info.index)
            .map_err(|e| ctx.member(format!("cannot decompress: {e}")))?;
        let mut out = Vec::with_capacity(info.size);
        file.read_to_end(&mut out)
            .map_err(|e| ctx.member(format!("cannot decompress: {e}")))?;
        Ok(out)
    }
}

/// Name (without `.npy`; `None` for directories) and data location of member `index`.
fn member_info(
    zip: &mut ZipArchive<Cursor<MapBytes>>,
    index: usize,
    file_len: usize,
) -> Result<(Option<String>, MemberInfo), String> {
    let file = zip
        .by_index_raw(index)
        .map_err(|e| format!("member #{index}: {e}"))?;
    let name = file
        .name()
        .map_err(|e| format!("member #{index}: {e}"))?
        .to_string();
    if file.is_dir() {
        return Ok((None, dummy_info(index)));
    }
    let data_start = file
        .data_start()
        .ok_or_else(|| format!("`{name}`: data offset unknown"))?;
    let info = MemberInfo {
        index,
        data_start: to_usize(data_start, &name)?,
        compressed_size: to_usize(file.compressed_size(), &name)?,
        size: to_usize(file.size(), &name)?,
        compression: file.compression(),
    };
    let end = info.data_start.checked_add(info.compressed_size);
    if end.is_none_or(|end| end > file_len) {
        return Err(format!(
            "`{name}` extends past the end of the file (truncated download?)"
        ));
    }
    if info.compression == CompressionMethod::Stored && info.size != info.compressed_size {
        return Err(format!("`{name}` is stored but its sizes disagree"));
    }
    let short = name.strip_suffix(".npy").unwrap_or(&name).to_string();
    Ok((Some(short), info))
}

fn dummy_info(index: usize) -> MemberInfo {
    MemberInfo {
        index,
        data_start: 0,
        compressed_size: 0,
        size: 0,
        compression: CompressionMethod::Stored,
    }
}

fn to_usize(v: u64, name: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("`{name}`: size {v} does not fit in memory"))
}

/// Reads a standalone `.npy` file.
pub fn read_npy(path: impl AsRef<Path>) -> Result<NpyArray, NpzError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| NpzError::Open {
        path: shown.clone(),
        source,
    })?;
    let member = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ctx = Ctx {
        path: &shown,
        member: &member,
    };
    let header = parse_npy_header(&bytes, &ctx)?;
    let len = header.byte_len(&ctx)?;
    if header.data_offset + len > bytes.len() {
        return Err(ctx.member(format!(
            "truncated: {} data bytes, {len} expected",
            bytes.len() - header.data_offset
        )));
    }
    let data = bytes[header.data_offset..header.data_offset + len].to_vec();
    Ok(header.into_array(Data::Owned(Arc::new(data))))
}

/// File and member names for error messages.
struct Ctx<'a> {
    path: &'a str,
    member: &'a str,
}

impl Ctx<'_> {
    fn member(&self, reason: String) -> NpzError {
        NpzError::Member {
            path: self.path.to_string(),
            member: self.member.to_string(),
            reason,
        }
    }
    fn header(&self, reason: impl Into<String>) -> NpzError {
        NpzError::Header {
            path: self.path.to_string(),
            member: self.member.to_string(),
            reason: reason.into(),
        }
    }
}

/// A parsed `.npy` header.
#[derive(Debug)]
struct NpyHeader {
    shape: Vec<usize>,
    dtype: NpyDtype,
    fortran_order: bool,
    big_endian: bool,
    /// Offset of the first element from the start of the `.npy` bytes.
    data_offset: usize,
}

impl NpyHeader {
    fn byte_len(&self, ctx: &Ctx) -> Result<usize, NpzError> {
        self.shape
            .iter()
            .try_fold(self.dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| ctx.header(format!("shape {:?} is too large", self.shape)))
    }

    fn into_array(self, data: Data) -> NpyArray {
        NpyArray {
            shape: self.shape,
            dtype: self.dtype,
            fortran_order: self.fortran_order,
            big_endian: self.big_endian,
            data,
        }
    }
}

const MAGIC: &[u8] = b"\x93NUMPY";

/// Length of the header text after the first 10 (version 1) or 12 bytes, from those bytes.
fn header_text_len(head: &[u8]) -> Option<usize> {
    match head.get(6)? {
        // Version 1 has a 10-byte preamble, so 2 of the 12 bytes read are header text.
        1 => Some((u16::from_le_bytes([*head.get(8)?, *head.get(9)?]) as usize).saturating_sub(2)),
        2 | 3 => Some(u32::from_le_bytes(head.get(8..12)?.try_into().ok()?) as usize),
        _ => None,
    }
}

/// Parses the magic, version, and the Python-dict header of a `.npy` file.
fn parse_npy_header(bytes: &[u8], ctx: &Ctx) -> Result<NpyHeader, NpzError> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(ctx.header("not a .npy array (missing \\x93NUMPY magic)"));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(ctx.header("truncated"));
            }
            let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (n as usize, 12)
        }
        v => return Err(ctx.header(format!("unknown .npy format version {v}"))),
    };
    let end = start + len;
    if end > bytes.len() {
        return Err(ctx.header("truncated"));
    }
    // Version 3 allows UTF-8; the fields we read are ASCII either way.
    let text =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| ctx.header("header is not text"))?;
    let descr = dict_string(text, "descr").ok_or_else(|| {
        ctx.header(format!(
            "no string `descr` (structured dtypes are not supported): {text}"
        ))
    })?;
    let fortran_order = dict_bool(text, "fortran_order")
        .ok_or_else(|| ctx.header(format!("no `fortran_order`: {text}")))?;
    let shape =
        dict_shape(text, "shape").ok_or_else(|| ctx.header(format!("no valid `shape`: {text}")))?;
    let (dtype, big_endian) = parse_descr(descr).ok_or_else(|| NpzError::Dtype {
        path: ctx.path.to_string(),
        member: ctx.member.to_string(),
        descr: descr.to_string(),
    })?;
    Ok(NpyHeader {
        shape,
        dtype,
        fortran_order,
        big_endian,
        data_offset: end,
    })
}

/// The text right after `'key':` in a Python dict literal.
fn dict_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = [format!("'{key}'"), format!("\"{key}\"")]
        .iter()
        .find_map(|k| text.find(k.as_str()).map(|i| i + k.len()))?;
    let rest = text[at..].trim_start().strip_prefix(':')?;
    Some(rest.trim_start())
}

fn dict_string<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let v = dict_value(text, key)?;
    let quote = v.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let body = &v[1..];
    body.find(quote).map(|end| &body[..end])
}

fn dict_bool(text: &str, key: &str) -> Option<bool> {
    let v = dict_value(text, key)?;
    if v.starts_with("True") {
        Some(true)
    } else if v.starts_with("False") {
        Some(false)
    } else {
        None
    }
}

fn dict_shape(text: &str, key: &str) -> Option<Vec<usize>> {
    let v = dict_value(text, key)?.strip_prefix('(')?;
    let inner = &v[..v.find(')')?];
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        // Python 2 wrote longs as `3L`.
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}

/// NumPy type string → dtype and whether it is big-endian.
fn parse_descr(descr: &str) -> Option<(NpyDtype, bool)> {
    let (order, code) = match descr.chars().next()? {
        c @ ('<' | '>' | '|' | '=') => (c, &descr[1..]),
        _ => ('|', descr),
    };
    let dtype = match code {
        "b1" | "?" => NpyDtype::Bool,
        "u1" => NpyDtype::U8,
        "i1" => NpyDtype::I8,
        "u2" => NpyDtype::U16,
        "i2" => NpyDtype::I16,
        "u4" => NpyDtype::U32,
        "i4" => NpyDtype::I32,
        "u8" => NpyDtype::U64,
        "i8" => NpyDtype::I64,
        "f2" => NpyDtype::F16,
        "f4" => NpyDtype::F32,
        "f8" => NpyDtype::F64,
        // 2-byte void is how bf16 reaches disk (NumPy has no bfloat16).
        "V2" | "bfloat16" => NpyDtype::BF16,
        _ => return None,
    };
    Some((dtype, order == '>' && dtype.size() > 1))
}

impl NpyArray {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> NpyDtype {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element bytes exactly as stored (byte order and memory order of the file).
    pub fn raw_bytes(&self) -> &[u8] {
        match &self.data {
            Data::Mapped { map, start, len } => &map[*start..*start + *len],
            Data::Owned(v) => v,
        }
    }

    /// Element bytes little-endian and in C (row-major) order, borrowed when the file
    /// already stores them that way (the usual case).
    pub fn le_bytes(&self) -> Cow<'_, [u8]> {
        let raw = self.raw_bytes();
        let width = self.dtype.size();
        let mut bytes = if self.fortran_order && self.shape.len() > 1 {
            Cow::Owned(fortran_to_c(raw, &self.shape, width))
        } else {
            Cow::Borrowed(raw)
        };
        if self.big_endian {
            for e in bytes.to_mut().chunks_exact_mut(width) {
                e.reverse();
            }
        }
        bytes
    }

    /// bf16 values as raw bits, C order; `None` unless the array is bf16 (`V2`).
    pub fn to_bf16_bits(&self) -> Option<Vec<u16>> {
        (self.dtype == NpyDtype::BF16).then(|| {
            self.le_bytes()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        })
    }

    /// All elements converted to f32, C order (integers and f64 rounded as `as f32` does).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let bytes = self.le_bytes();
        let b = bytes.as_ref();
        macro_rules! conv {
            ($n:literal, $f:expr) => {
                b.chunks_exact($n)
                    .map(|c| $f(c.try_into().expect("chunk width")))
                    .collect()
            };
        }
        match self.dtype {
            NpyDtype::Bool => b.iter().map(|&x| (x != 0) as u8 as f32).collect(),
            NpyDtype::U8 => b.iter().map(|&x| x as f32).collect(),
            NpyDtype::I8 => b.iter().map(|&x| x as i8 as f32).collect(),
            NpyDtype::U16 => conv!(2, |c| u16::from_le_bytes(c) as f32),
            NpyDtype::I16 => conv!(2, |c| i16::from_le_bytes(c) as f32),
            NpyDtype::U32 => conv!(4, |c| u32::from_le_bytes(c) as f32),
            NpyDtype::I32 => conv!(4, |c| i32::from_le_bytes(c) as f32),
            NpyDtype::U64 => conv!(8, |c| u64::from_le_bytes(c) as f32),
            NpyDtype::I64 => conv!(8, |c| i64::from_le_bytes(c) as f32),
            NpyDtype::F16 => conv!(2, |c| half::f16::from_le_bytes(c).to_f32()),
            NpyDtype::BF16 => conv!(2, |c| half::bf16::from_le_bytes(c).to_f32()),
            NpyDtype::F32 => conv!(4, f32::from_le_bytes),
            NpyDtype::F64 => conv!(8, |c| f64::from_le_bytes(c) as f32),
        }
    }
}

/// Reorders elements of `width` bytes from Fortran (column-major) to C (row-major) order.
fn fortran_to_c(raw: &[u8], shape: &[usize], width: usize) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n * width);
    // Fortran strides in elements: the first axis varies fastest.
    let mut strides = vec![1usize; shape.len()];
    for k in 1..shape.len() {
        strides[k] = strides[k - 1] * shape[k - 1];
    }
    // Walk C order with an odometer over the multi-index.
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        let off: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.extend_from_slice(&raw[off * width..(off + 1) * width]);
        for k in (0..shape.len()).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx<'static> {
        Ctx {
            path: "x.npz",
            member: "a",
        }
    }

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.to_string();
        // Pad as NumPy does: total header a multiple of 64, ending in '\n'.
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn headers_parse() {
        let b = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &[],
        );
        let h = parse_npy_header(&b, &ctx()).unwrap();
        assert_eq!(h.shape, vec![2, 3]);
        assert_eq!(h.dtype, NpyDtype::F32);
        assert!(!h.fortran_order && !h.big_endian);
        assert_eq!(h.data_offset % 64, 0);
        let b = npy(
            "{'descr': '|V2', 'fortran_order': True, 'shape': (), }",
            &[],
        );
        let h = parse_npy_header(&b, &ctx()).unwrap();
        assert_eq!((h.dtype, h.shape.len()), (NpyDtype::BF16, 0));
        let b = npy(
            "{'descr': '>i8', 'fortran_order': False, 'shape': (7,), }",
            &[],
        );
        let h = parse_npy_header(&b, &ctx()).unwrap();
        assert_eq!(
            (h.dtype, h.big_endian, h.shape),
            (NpyDtype::I64, true, vec![7])
        );
    }

    #[test]
    fn bad_headers_are_errors() {
        let err = parse_npy_header(b"PK\x03\x04 not npy", &ctx()).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
        let b = npy(
            "{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }",
            &[],
        );
        let err = parse_npy_header(&b, &ctx()).unwrap_err().to_string();
        assert!(
            err.contains("<c8") && err.contains("`a`") && err.contains("x.npz"),
            "{err}"
        );
        let b = npy(
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }",
            &[],
        );
        assert!(parse_npy_header(&b, &ctx()).is_err());
        let b = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }",
            &[],
        );
        assert!(parse_npy_header(&b, &ctx()).is_err());
        let mut b = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
            &[],
        );
        b.truncate(30);
        assert!(parse_npy_header(&b, &ctx()).is_err());
    }

    #[test]
    fn fortran_order_is_transposed() {
        // A 2×3 array [[0,1,2],[3,4,5]] stored column-major: 0 3 1 4 2 5.
        let raw: Vec<u8> = [0u8, 3, 1, 4, 2, 5].to_vec();
        assert_eq!(fortran_to_c(&raw, &[2, 3], 1), vec![0, 1, 2, 3, 4, 5]);
        // 2×2×2: element (i,j,k) at i + 2j + 4k.
        let raw: Vec<u8> = (0..8).collect();
        let c = fortran_to_c(&raw, &[2, 2, 2], 1);
        assert_eq!(c, vec![0, 4, 2, 6, 1, 5, 3, 7]);
    }

    #[test]
    fn big_endian_and_bf16_values_convert() {
        let a = NpyArray {
            shape: vec![2],
            dtype: NpyDtype::F32,
            fortran_order: false,
            big_endian: true,
            data: Data::Owned(Arc::new(
                [1.5f32.to_be_bytes(), (-2.0f32).to_be_bytes()].concat(),
            )),
        };
        assert_eq!(a.to_f32_vec(), vec![1.5, -2.0]);
        let bits = [
            half::bf16::from_f32(0.5).to_bits(),
            half::bf16::from_f32(-3.0).to_bits(),
        ];
        let a = NpyArray {
            shape: vec![2],
            dtype: NpyDtype::BF16,
            fortran_order: false,
            big_endian: false,
            data: Data::Owned(Arc::new(
                bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
            )),
        };
        assert_eq!(a.to_f32_vec(), vec![0.5, -3.0]);
        assert_eq!(a.to_bf16_bits().unwrap(), bits.to_vec());
    }
}
