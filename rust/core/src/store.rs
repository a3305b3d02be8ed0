//! `PreferenceStore`: every tokenized preference pair in one contiguous `u32` arena.
//!
//! Pair `i` occupies `tokens[bounds[3i] .. bounds[3i+3]]` as `[prompt | chosen | rejected]`, so the
//! whole store is three flat arrays (`tokens`, `bounds`, `ids`). That keeps appends cheap, makes
//! the on-disk form a straight dump of the same arrays, and lets a saved store be memory-mapped and
//! used without parsing or copying.
//!
//! File format (all little-endian, every array 8-byte aligned):
//! ```text
//! 0   magic  b"EPSDPOST"
//! 8   u32    format version (1)
//! 12  u32    flags (bit 0: vocab_size is set)
//! 16  u32    vocab_size
//! 20  u32    reserved (0)
//! 24  u64    number of pairs n
//! 32  u64    number of tokens t
//! 40  u64 × (3n+1)  bounds
//! ..  u64 × n       pair ids
//! ..  u32 × t       tokens, then zero padding to a multiple of 8
//! ..  u32    CRC-32 of every byte before it
//! ```

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use memmap2::Mmap;

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"EPSDPOST";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 40;
const FLAG_HAS_VOCAB: u32 = 1;

/// A token id as it may arrive from Python (numpy int64 from tokenizers, int32, uint32, ...).
/// Conversion is checked, so a negative id is reported instead of wrapping around.
pub trait TokenId: Copy {
    fn to_u32(self) -> Option<u32>;
}
macro_rules! impl_token_id {
    ($($t:ty),*) => {$(
        impl TokenId for $t {
            #[inline]
            fn to_u32(self) -> Option<u32> { u32::try_from(self).ok() }
        }
    )*};
}
impl_token_id!(u8, u16, u32, u64, i8, i16, i32, i64);

/// Many pairs in flat form, the shape ingestion produces: for each of prompt / chosen / rejected,
/// one token array and `n + 1` offsets into it.
#[derive(Clone, Copy, Debug)]
pub struct PairColumns<'a, T> {
    pub prompt: (&'a [T], &'a [u64]),
    pub chosen: (&'a [T], &'a [u64]),
    pub rejected: (&'a [T], &'a [u64]),
    /// One id per pair; `None` numbers the pairs on from the store's current length.
    pub ids: Option<&'a [u64]>,
}

/// The three spans of one pair, as slices of the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair<'a> {
    pub id: u64,
    pub prompt: &'a [u32],
    pub chosen: &'a [u32],
    pub rejected: &'a [u32],
}

enum Storage {
    Owned { tokens: Vec<u32>, bounds: Vec<u64>, ids: Vec<u64> },
    /// A loaded file; the ranges are byte ranges of the three arrays inside the map.
    Mapped { map: Mmap, bounds: Range<usize>, ids: Range<usize>, tokens: Range<usize>, file: MappedFile },
}

/// The file behind a map, kept open so that [`PreferenceStore::check_file`] can ask the inode
/// itself (a later save renames a new file over the path, which is fine and must not count as
/// a change) whether it was truncated or rewritten in place since `load` verified it.
struct MappedFile {
    file: File,
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

pub struct PreferenceStore {
    storage: Storage,
    vocab_size: Option<u32>,
    /// Built on first need: a loaded store that is only read never pays for it.
    id_set: Option<HashSet<u64>>,
}

impl std::fmt::Debug for PreferenceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreferenceStore")
            .field("pairs", &self.len())
            .field("tokens", &self.num_tokens())
            .field("vocab_size", &self.vocab_size)
            .field("memory_mapped", &self.is_memory_mapped())
            .finish()
    }
}

impl Default for PreferenceStore {
    fn default() -> Self {
        Self::empty(None)
    }
}

impl PreferenceStore {
    /// An empty store; with `vocab_size`, every token appended must be below it. A vocabulary of
    /// 0 tokens would refuse every pair, so it is refused here instead.
    pub fn new(vocab_size: Option<u32>) -> Result<Self> {
        if vocab_size == Some(0) {
            return Err(Error::arg("vocab_size must be at least 1 (got 0); pass None for no vocabulary check"));
        }
        Ok(Self::empty(vocab_size))
    }

    fn empty(vocab_size: Option<u32>) -> Self {
        PreferenceStore {
            storage: Storage::Owned { tokens: Vec::new(), bounds: vec![0], ids: Vec::new() },
            vocab_size,
            id_set: Some(HashSet::new()),
        }
    }

    pub fn vocab_size(&self) -> Option<u32> {
        self.vocab_size
    }

    pub fn len(&self) -> usize {
        self.ids().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens().len()
    }

    pub fn is_memory_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    pub fn tokens(&self) -> &[u32] {
        match &self.storage {
            Storage::Owned { tokens, .. } => tokens,
            Storage::Mapped { map, tokens, .. } => bytemuck::cast_slice(&map[tokens.clone()]),
        }
    }

    pub fn bounds(&self) -> &[u64] {
        match &self.storage {
            Storage::Owned { bounds, .. } => bounds,
            Storage::Mapped { map, bounds, .. } => bytemuck::cast_slice(&map[bounds.clone()]),
        }
    }

    pub fn ids(&self) -> &[u64] {
        match &self.storage {
            Storage::Owned { ids, .. } => ids,
            Storage::Mapped { map, ids, .. } => bytemuck::cast_slice(&map[ids.clone()]),
        }
    }

    /// The spans of pair `index`, or an error naming it when it is out of range.
    pub fn get(&self, index: usize) -> Result<Pair<'_>> {
        if index >= self.len() {
            return Err(Error::pair(index, format!("out of range for a store of {} pairs", self.len())));
        }
        self.check_file()?;
        self.pair_checked(index)
    }

    /// For a memory-mapped store: an error when its file changed size or modification time since
    /// `load` verified it (truncated or rewritten in place). Checking first means a truncated file
    /// is an error instead of a SIGBUS on the next read of a page past its new end. Owned stores
    /// always pass. One `fstat`, cheap enough for every batch.
    pub fn check_file(&self) -> Result<()> {
        let Storage::Mapped { file, .. } = &self.storage else { return Ok(()) };
        let meta = file.file.metadata().map_err(Error::file(&file.path, "check the memory-mapped store file"))?;
        if meta.len() != file.len {
            return Err(self.changed(format!("the file is now {} bytes, it was {} when loaded (truncated or rewritten in place)", meta.len(), file.len)));
        }
        if meta.modified().ok() != file.modified {
            return Err(self.changed("the file was modified in place after it was loaded".into()));
        }
        Ok(())
    }

    fn changed(&self, what: String) -> Error {
        let path = match &self.storage {
            Storage::Mapped { file, .. } => file.path.clone(),
            Storage::Owned { .. } => PathBuf::new(),
        };
        Error::StoreFile {
            path,
            reason: format!("{what}; a memory-mapped store must not be overwritten while in use (save writes a new file and renames it, which is safe); load it again"),
        }
    }

    /// Pair `index` (already known to be in range), re-validated when it comes from a mapped
    /// file: `load` checked every pair, but a file rewritten in place since could hold bounds that
    /// would slice out of range, or tokens the model cannot embed. An owned store was validated
    /// on append and cannot change behind our back.
    pub(crate) fn pair_checked(&self, index: usize) -> Result<Pair<'_>> {
        let Storage::Mapped { file, .. } = &self.storage else { return Ok(self.pair(index)) };
        let bad = |reason: String| Error::MappedPair { path: file.path.clone(), pair: index, reason };
        let b = &self.bounds()[3 * index..3 * index + 4];
        let n = self.num_tokens() as u64;
        if !(b[0] < b[1] && b[1] < b[2] && b[2] < b[3] && b[3] <= n) {
            return Err(bad(format!("its spans {b:?} are empty, out of order or past the {n} tokens (was the file changed while loaded?)")));
        }
        let pair = self.pair(index);
        if let Some(v) = self.vocab_size {
            for (which, span) in [("prompt", pair.prompt), ("chosen", pair.chosen), ("rejected", pair.rejected)] {
                if let Some(k) = span.iter().position(|&t| t >= v) {
                    return Err(bad(format!("{which} token {k} = {} is not below vocab_size {v} (was the file changed while loaded?)", span[k])));
                }
            }
        }
        Ok(pair)
    }

    /// Unchecked-by-contract access for the hot path; callers have validated `index` (and, for a
    /// mapped store, the bounds: see [`pair_checked`](Self::pair_checked)).
    #[inline]
    pub(crate) fn pair(&self, index: usize) -> Pair<'_> {
        let b = &self.bounds()[3 * index..3 * index + 4];
        let t = self.tokens();
        let (p, c, r, e) = (b[0] as usize, b[1] as usize, b[2] as usize, b[3] as usize);
        Pair { id: self.ids()[index], prompt: &t[p..c], chosen: &t[c..r], rejected: &t[r..e] }
    }

    /// Per-pair span lengths `(prompt, chosen, rejected)`, for samplers and statistics.
    pub fn lengths(&self) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let n = self.len();
        let b = self.bounds();
        let (mut p, mut c, mut r) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        // Saturating: bounds of a mapped file rewritten in place may be out of order, and a length
        // must then come out wrong rather than panic (callers check `check_file` first).
        let len = |a: u64, b: u64| b.saturating_sub(a).min(u32::MAX as u64) as u32;
        for w in b.windows(4).step_by(3) {
            p.push(len(w[0], w[1]));
            c.push(len(w[1], w[2]));
            r.push(len(w[2], w[3]));
        }
        (p, c, r)
    }

    /// Check every index once, so the collate loop can index without bounds errors.
    pub fn check_indices(&self, indices: &[u32]) -> Result<()> {
        let n = self.len();
        match indices.iter().position(|&i| i as usize >= n) {
            Some(k) => Err(Error::pair(indices[k] as usize, format!("index out of range for a store of {n} pairs"))),
            None => Ok(()),
        }
    }

    /// Append one pair; returns its index.
    pub fn add_pair<T: TokenId>(&mut self, prompt: &[T], chosen: &[T], rejected: &[T], id: Option<u64>) -> Result<usize> {
        let ids = id.map(|id| [id]);
        self.append(PairColumns {
            prompt: (prompt, &[0, prompt.len() as u64]),
            chosen: (chosen, &[0, chosen.len() as u64]),
            rejected: (rejected, &[0, rejected.len() as u64]),
            ids: ids.as_ref().map(|a| &a[..]),
        })?;
        Ok(self.len() - 1)
    }

    /// Append many pairs at once. Everything is validated before anything is written, so a failed
    /// append leaves the store exactly as it was. Errors name the pair by its position in `columns`.
    pub fn append<T: TokenId>(&mut self, columns: PairColumns<'_, T>) -> Result<Range<usize>> {
        // A mapped store is copied into memory on the first append: never copy a changed file.
        self.check_file()?;
        let n = self.validate(&columns)?;
        let start = self.len();
        let new_ids: Vec<u64> = match columns.ids {
            Some(ids) => ids.to_vec(),
            None => {
                let first = self.next_free_id();
                (0..n as u64).map(|k| first + k).collect()
            }
        };
        let (tokens, bounds, ids) = self.owned_mut();
        let added: usize = [columns.prompt, columns.chosen, columns.rejected]
            .iter()
            .map(|(_, off)| (off[n] - off[0]) as usize)
            .sum();
        tokens.reserve(added);
        bounds.reserve(3 * n);
        // Each span pushes its end bound; the previous pair's end is this pair's start.
        for i in 0..n {
            for (toks, off) in [columns.prompt, columns.chosen, columns.rejected] {
                let span = &toks[off[i] as usize..off[i + 1] as usize];
                // Validation proved every conversion succeeds.
                tokens.extend(span.iter().map(|t| t.to_u32().unwrap_or(0)));
                bounds.push(tokens.len() as u64);
            }
        }
        ids.extend_from_slice(&new_ids);
        let set = self.id_set.get_or_insert_with(HashSet::new);
        set.extend(new_ids);
        Ok(start..start + n)
    }

    fn next_free_id(&self) -> u64 {
        self.ids().iter().max().map_or(self.len() as u64, |&m| (m + 1).max(self.len() as u64))
    }

    fn validate<T: TokenId>(&mut self, c: &PairColumns<'_, T>) -> Result<usize> {
        let n = c.prompt.1.len().checked_sub(1).ok_or_else(|| Error::arg("prompt offsets must hold n + 1 entries"))?;
        for (name, (toks, off)) in [("prompt", c.prompt), ("chosen", c.chosen), ("rejected", c.rejected)] {
            if off.len() != n + 1 {
                return Err(Error::arg(format!(
                    "{name} offsets hold {} entries but prompt offsets describe {n} pairs (need n + 1)",
                    off.len()
                )));
            }
            for i in 0..n {
                let (a, b) = (off[i], off[i + 1]);
                if a > b {
                    return Err(Error::pair(i, format!("{name} offsets out of order ({a} > {b})")));
                }
                if b > toks.len() as u64 {
                    return Err(Error::pair(i, format!("{name} offset {b} is past the end of its {} tokens", toks.len())));
                }
                if a == b {
                    return Err(Error::pair(i, match name {
                        "prompt" => "prompt is empty: nothing would predict the first completion token (add a BOS token)".to_string(),
                        _ => format!("{name} completion is empty"),
                    }));
                }
                for (k, t) in toks[a as usize..b as usize].iter().enumerate() {
                    let id = t.to_u32().ok_or_else(|| {
                        Error::pair(i, format!("{name} token {k} is not a valid token id (negative or above u32)"))
                    })?;
                    if let Some(v) = self.vocab_size {
                        if id >= v {
                            return Err(Error::pair(i, format!("{name} token {k} = {id} is not below vocab_size {v}")));
                        }
                    }
                }
            }
        }
        if let Some(ids) = c.ids {
            if ids.len() != n {
                return Err(Error::arg(format!("{} pair ids given for {n} pairs", ids.len())));
            }
            let existing = self.id_set();
            let mut fresh = HashSet::with_capacity(n);
            for (i, id) in ids.iter().enumerate() {
                if existing.contains(id) || !fresh.insert(*id) {
                    return Err(Error::pair(i, format!("pair id {id} is already used")));
                }
            }
        }
        Ok(n)
    }

    fn id_set(&mut self) -> &HashSet<u64> {
        if self.id_set.is_none() {
            self.id_set = Some(self.ids().iter().copied().collect());
        }
        self.id_set.as_ref().expect("just built")
    }

    /// Appending to a memory-mapped store copies it into memory first (copy on write).
    fn owned_mut(&mut self) -> (&mut Vec<u32>, &mut Vec<u64>, &mut Vec<u64>) {
        if let Storage::Mapped { .. } = self.storage {
            self.storage = Storage::Owned { tokens: self.tokens().to_vec(), bounds: self.bounds().to_vec(), ids: self.ids().to_vec() };
        }
        match &mut self.storage {
            Storage::Owned { tokens, bounds, ids } => (tokens, bounds, ids),
            Storage::Mapped { .. } => unreachable!("converted above"),
        }
    }

    /// Write the store to `path` atomically: a temporary file beside it, synced, then renamed.
    /// Every save writes a temporary file of its own (see [`create_temp`]), so concurrent saves to
    /// one path never write into each other's file: the last one to finish is the file left.
    pub fn save(&self, path: &Path) -> Result<()> {
        // Never write out a mapped file that changed under us.
        self.check_file()?;
        let (tmp, file) = create_temp(path).map_err(Error::file(path, "save the preference store"))?;
        let io = Error::file(path, "save the preference store");
        let result = (|| -> std::io::Result<()> {
            let mut file = std::io::BufWriter::new(file);
            let mut crc = crc32fast::Hasher::new();
            let mut put = |bytes: &[u8]| -> std::io::Result<()> {
                crc.update(bytes);
                file.write_all(bytes)?;
                Ok(())
            };
            let flags = if self.vocab_size.is_some() { FLAG_HAS_VOCAB } else { 0 };
            put(MAGIC)?;
            put(&FORMAT_VERSION.to_le_bytes())?;
            put(&flags.to_le_bytes())?;
            put(&self.vocab_size.unwrap_or(0).to_le_bytes())?;
            put(&0u32.to_le_bytes())?;
            put(&(self.len() as u64).to_le_bytes())?;
            put(&(self.num_tokens() as u64).to_le_bytes())?;
            put_le_u64s(&mut put, self.bounds())?;
            put_le_u64s(&mut put, self.ids())?;
            put_le_u32s(&mut put, self.tokens())?;
            if self.num_tokens() % 2 == 1 {
                put(&[0u8; 4])?;
            }
            let sum = crc.finalize();
            file.write_all(&sum.to_le_bytes())?;
            file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io)
    }

    /// Load a saved store by memory-mapping it. The checksum and every structural invariant are
    /// verified first, so a damaged file is an error and never silently wrong data.
    ///
    /// The file must not be truncated or rewritten in place while the store is alive (see
    /// [`check_file`](Self::check_file) for what is detected; a truncation that races a read is a
    /// SIGBUS, which no check can prevent). Saving over it (temporary file + rename) is safe.
    pub fn load(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(Error::file(path, "open the preference store"))?;
        // Taken before mapping: a change during the checks below then shows as a mismatch later.
        let meta = file.metadata().map_err(Error::file(path, "read the metadata of the preference store"))?;
        if meta.is_dir() {
            // Opening a directory succeeds on Unix; mapping it would fail with a baffling ENODEV.
            return Err(Error::StoreFile { path: path.to_path_buf(), reason: "a directory, not a preference store file".into() });
        }
        // SAFETY: the map is read-only and private to this store; a concurrent writer of the same
        // file is outside the contract (saves go through a rename, which never touches an open map),
        // and `check_file` / `pair_checked` catch what they can of one that breaks it.
        let map = unsafe { Mmap::map(&file).map_err(Error::file(path, "memory-map the preference store"))? };
        let bad = |reason: String| Error::StoreFile { path: path.to_path_buf(), reason };
        if map.len() < HEADER_LEN + 4 || &map[..8] != MAGIC {
            return Err(bad("not an epsdpo preference store (bad magic or too short)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(bad(format!("format version {version}, this build reads version {FORMAT_VERSION}")));
        }
        let flags = u32_at(12);
        let vocab_size = (flags & FLAG_HAS_VOCAB != 0).then(|| u32_at(16));
        if vocab_size == Some(0) {
            return Err(bad("the header declares vocab_size 0".into()));
        }
        let (n, t) = (u64_at(24), u64_at(32));
        let sizes = (|| {
            let bounds_len = n.checked_mul(3)?.checked_add(1)?.checked_mul(8)?;
            let ids_len = n.checked_mul(8)?;
            let tokens_len = t.checked_mul(4)?;
            let padded = tokens_len.checked_add(7)? / 8 * 8;
            let total = (HEADER_LEN as u64).checked_add(bounds_len)?.checked_add(ids_len)?.checked_add(padded)?.checked_add(4)?;
            Some((bounds_len as usize, ids_len as usize, tokens_len as usize, total))
        })();
        let (bounds_len, ids_len, tokens_len, total) =
            sizes.ok_or_else(|| bad(format!("header sizes overflow ({n} pairs, {t} tokens)")))?;
        if map.len() as u64 != total {
            return Err(bad(format!("file is {} bytes, the header describes {total} (truncated or corrupted)", map.len())));
        }
        let body = map.len() - 4;
        let stored = u32_at(body);
        if crc32fast::hash(&map[..body]) != stored {
            return Err(bad("checksum mismatch (corrupted file)".into()));
        }
        if cfg!(target_endian = "big") {
            return Err(bad("memory-mapped stores need a little-endian machine".into()));
        }
        let bounds = HEADER_LEN..HEADER_LEN + bounds_len;
        let ids = bounds.end..bounds.end + ids_len;
        let tokens = ids.end..ids.end + tokens_len;
        let file = MappedFile { file, path: path.to_path_buf(), len: meta.len(), modified: meta.modified().ok() };
        let store = PreferenceStore { storage: Storage::Mapped { map, bounds, ids, tokens, file }, vocab_size, id_set: None };
        store.check_structure().map_err(bad)?;
        Ok(store)
    }

    /// The invariants append guarantees, re-checked for data that came from disk.
    fn check_structure(&self) -> std::result::Result<(), String> {
        let b = self.bounds();
        if b.first() != Some(&0) || b.last() != Some(&(self.num_tokens() as u64)) {
            return Err("bounds do not span the token array".into());
        }
        for (i, w) in b.windows(4).step_by(3).enumerate() {
            if !(w[0] < w[1] && w[1] < w[2] && w[2] < w[3]) {
                return Err(format!("pair {i} has an empty or out-of-order span"));
            }
        }
        if let Some(v) = self.vocab_size {
            if let Some(k) = self.tokens().iter().position(|&t| t >= v) {
                return Err(format!("token at {k} is not below vocab_size {v}"));
            }
        }
        let mut seen = HashSet::with_capacity(self.len());
        if let Some(i) = self.ids().iter().position(|id| !seen.insert(*id)) {
            return Err(format!("pair {i} repeats an id"));
        }
        Ok(())
    }
}

/// Distinguishes the saves of one process (threads included) from one another.
static SAVES: AtomicU64 = AtomicU64::new(0);

/// `<name>.epsdpo-tmp<pid>.<unique>` beside `path`, created exclusively. The pid comes first because
/// the dataset cache removes temporary files whose writer process is gone by it; the suffix (this
/// process's save counter and the clock) keeps two threads of one process, or two hosts whose pids
/// coincide on a shared filesystem, from sharing a file. `create_new` makes a collision an error
/// (retried under another name) rather than two writers in one file.
fn create_temp(path: &Path) -> std::io::Result<(PathBuf, File)> {
    let base = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let mut attempt = 0;
    loop {
        let count = SAVES.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let mut name = base.clone();
        name.push(format!(".epsdpo-tmp{}.{count:x}-{nanos:08x}", std::process::id()));
        let tmp = path.with_file_name(name);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

fn put_le_u64s(put: &mut impl FnMut(&[u8]) -> std::io::Result<()>, values: &[u64]) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        return put(bytemuck::cast_slice(values));
    }
    values.iter().try_for_each(|v| put(&v.to_le_bytes()))
}

fn put_le_u32s(put: &mut impl FnMut(&[u8]) -> std::io::Result<()>, values: &[u32]) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        return put(bytemuck::cast_slice(values));
    }
    values.iter().try_for_each(|v| put(&v.to_le_bytes()))
}
