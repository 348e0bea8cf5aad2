//! The store-and-forward buffer of the `kafka` sink: a bounded on-disk queue of records in
//! segment files, read oldest first, that survives a restart.
//!
//! # Layout
//!
//! A folder (`dir`) holds segment files `<first sequence number, 20 digits>.seg` and a
//! `cursor` file. Records are appended to the newest segment; a segment is closed at
//! `segment_bytes` and a new one started. Each record is framed as
//!
//! ```text
//! u32 key length (u32::MAX: no key) | u32 value length | key | value | u32 checksum
//! ```
//!
//! (little-endian; the checksum is FNV-1a of key and value, folded to 32 bits). `cursor`
//! holds the sequence number of the oldest record not yet delivered; it is rewritten (write,
//! then rename) at most every `CURSOR_INTERVAL` and whenever a segment is deleted. A segment
//! whose records were all delivered is deleted.
//!
//! # Restart
//!
//! On open, the segments are scanned in order; a torn record at the end of the last one (a
//! crash in the middle of a write) is cut off. Delivery resumes at the cursor: records
//! delivered after the cursor's last write are delivered again (at-least-once).
//!
//! # Bound
//!
//! The segment files never hold more than `max_bytes`. When a new record does not fit, the
//! `when_full` policy decides: `drop_oldest` deletes the oldest segment (the records not yet
//! delivered in it are lost, counted), `drop_newest` refuses the new records (counted). Each
//! write goes to the operating system at once (a crash of tidewatch loses nothing written);
//! `fsync` is left to the operating system's writeback unless `fsync = true`.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tidewatch_api::records::stable_hash;

/// How often the cursor file is rewritten at most while records are delivered.
const CURSOR_INTERVAL: Duration = Duration::from_millis(500);
const NO_KEY: u32 = u32::MAX;
/// Frame bytes around key and value: two lengths and the checksum.
const FRAME_BYTES: u64 = 12;

fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_segment_bytes() -> u64 {
    8 * 1024 * 1024
}

/// What the buffer does with a record that does not fit in `max_bytes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest segment to make room: the freshest data survives a long outage.
    #[default]
    DropOldest,
    /// Refuse new records: the oldest data survives.
    DropNewest,
}

impl WhenFull {
    /// The `reason` label of the records this policy drops.
    pub fn reason(self) -> &'static str {
        match self {
            WhenFull::DropOldest => "buffer_full_drop_oldest",
            WhenFull::DropNewest => "buffer_full_drop_newest",
        }
    }
}

/// Options of the store-and-forward buffer (`[sinks.x.buffer]`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// The folder of the segment files (created if missing); relative to the pipeline file.
    pub dir: PathBuf,
    /// Most bytes the segment files hold together.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Size at which a segment is closed and a new one started, bytes.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// `drop_oldest` or `drop_newest`.
    #[serde(default)]
    pub when_full: WhenFull,
    /// fsync every append (survives power loss, costs a disk flush per batch).
    #[serde(default)]
    pub fsync: bool,
}

impl BufferConfig {
    /// A buffer in `dir` with the default bounds.
    pub fn new(dir: impl Into<PathBuf>) -> BufferConfig {
        BufferConfig {
            dir: dir.into(),
            max_bytes: default_max_bytes(),
            segment_bytes: default_segment_bytes(),
            when_full: WhenFull::default(),
            fsync: false,
        }
    }
}

/// Why the buffer failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// A file of the buffer could not be read or written.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(
    context: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BufferError + 'a {
    move |source| BufferError::Io { context, path: path.to_owned(), source }
}

/// One buffered record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number (position in the buffer since it was created).
    pub seq: u64,
    /// The message key.
    pub key: Option<Vec<u8>>,
    /// The message value.
    pub value: Vec<u8>,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    records: u64,
    bytes: u64,
    path: PathBuf,
}

#[derive(Debug)]
struct State {
    segments: VecDeque<Segment>,
    writer: Option<File>,
    bytes: u64,
    /// The next record's sequence number.
    next_seq: u64,
    /// The oldest record not yet delivered (the cursor).
    acked: u64,
    /// The next record to hand to the forwarder.
    read: u64,
    /// Delivered records beyond `acked` (not contiguous yet).
    done: BTreeMap<u64, ()>,
    /// The segment being read, loaded: its first sequence number and records.
    loaded: Option<(u64, Vec<Record>)>,
    cursor_written: Instant,
    cursor_value: u64,
    dropped: u64,
}

/// Counts of what the buffer holds and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    /// Records not yet delivered.
    pub records: u64,
    /// Bytes of the segment files.
    pub bytes: u64,
    /// Records dropped because the buffer was full, since it was opened.
    pub dropped: u64,
}

/// A bounded, persistent, oldest-first queue of records (see the module documentation).
#[derive(Debug)]
pub struct DiskBuffer {
    config: BufferConfig,
    state: Mutex<State>,
    appended: Condvar,
}

fn frame_len(key: Option<&[u8]>, value: &[u8]) -> u64 {
    FRAME_BYTES + key.map_or(0, <[u8]>::len) as u64 + value.len() as u64
}

fn checksum(key: Option<&[u8]>, value: &[u8]) -> u32 {
    let mut bytes = Vec::with_capacity(key.map_or(0, <[u8]>::len) + value.len());
    bytes.extend_from_slice(key.unwrap_or_default());
    bytes.extend_from_slice(value);
    let hash = stable_hash(&bytes);
    (hash ^ (hash >> 32)) as u32
}

fn encode(out: &mut Vec<u8>, key: Option<&[u8]>, value: &[u8]) {
    let key_len = key.map_or(NO_KEY, |key| key.len() as u32);
    out.extend_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(key.unwrap_or_default());
    out.extend_from_slice(value);
    out.extend_from_slice(&checksum(key, value).to_le_bytes());
}

/// The whole records of a segment's bytes, and the length they span (a torn tail excluded).
fn decode(bytes: &[u8], first_seq: u64) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0usize;
    let word = |at: usize| -> Option<u32> {
        bytes.get(at..at + 4).and_then(|word| word.try_into().ok()).map(u32::from_le_bytes)
    };
    while let (Some(key_len), Some(value_len)) = (word(at), word(at + 4)) {
        let key_bytes = if key_len == NO_KEY { 0 } else { key_len as usize };
        let start = at + 8;
        let value_start = start + key_bytes;
        let end = value_start + value_len as usize;
        let (Some(key), Some(value), Some(sum)) =
            (bytes.get(start..value_start), bytes.get(value_start..end), word(end))
        else {
            break;
        };
        let key = (key_len != NO_KEY).then_some(key);
        if checksum(key, value) != sum {
            break;
        }
        records.push(Record {
            seq: first_seq + records.len() as u64,
            key: key.map(<[u8]>::to_vec),
            value: value.to_vec(),
        });
        at = end + 4;
    }
    (records, at)
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

impl DiskBuffer {
    /// Opens (or creates) the buffer in `config.dir`, recovering what an earlier run left.
    pub fn open(config: BufferConfig) -> Result<DiskBuffer, BufferError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(io("cannot create the buffer folder", &dir))?;
        let mut firsts: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io("cannot list the buffer folder", &dir))? {
            let entry = entry.map_err(io("cannot list the buffer folder", &dir))?;
            let path = entry.path();
            let first = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".seg"))
                .and_then(|stem| stem.parse::<u64>().ok());
            if let Some(first) = first {
                firsts.push((first, path));
            }
        }
        firsts.sort();
        let cursor_path = dir.join("cursor");
        let mut acked = fs::read_to_string(&cursor_path)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let mut segments = VecDeque::new();
        let mut bytes_total = 0;
        let mut next_seq = firsts.first().map_or(acked, |(first, _)| *first);
        for (index, (first, path)) in firsts.iter().enumerate() {
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut file| file.read_to_end(&mut bytes))
                .map_err(io("cannot read the buffer segment", path))?;
            let (records, valid) = decode(&bytes, *first);
            if valid < bytes.len() {
                tracing::warn!(path = %path.display(), cut_bytes = bytes.len() - valid, "cutting a torn record off the buffer segment");
                let file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io("cannot repair the buffer segment", path))?;
                file.set_len(valid as u64).map_err(io("cannot repair the buffer segment", path))?;
            }
            let count = records.len() as u64;
            let last = index + 1 == firsts.len();
            if first + count <= acked && !last {
                // Delivered entirely: its deletion did not happen before the stop.
                let _ = fs::remove_file(path);
                continue;
            }
            next_seq = first + count;
            bytes_total += valid as u64;
            segments.push_back(Segment {
                first_seq: *first,
                records: count,
                bytes: valid as u64,
                path: path.clone(),
            });
        }
        if let Some(oldest) = segments.front() {
            acked = acked.clamp(oldest.first_seq, next_seq);
        } else {
            acked = acked.max(next_seq);
            next_seq = acked;
        }
        let writer = match segments.back() {
            Some(segment) if segment.bytes < config.segment_bytes => Some(
                OpenOptions::new()
                    .append(true)
                    .open(&segment.path)
                    .map_err(io("cannot open the buffer segment", &segment.path))?,
            ),
            _ => None,
        };
        let state = State {
            segments,
            writer,
            bytes: bytes_total,
            next_seq,
            acked,
            read: acked,
            done: BTreeMap::new(),
            loaded: None,
            cursor_written: Instant::now(),
            cursor_value: acked,
            dropped: 0,
        };
        let buffer = DiskBuffer { config, state: Mutex::new(state), appended: Condvar::new() };
        if next_seq > acked {
            tracing::info!(dir = %dir.display(), records = next_seq - acked, bytes = bytes_total, "store-and-forward buffer holds records from an earlier run");
        }
        Ok(buffer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What it does when full.
    pub fn policy(&self) -> WhenFull {
        self.config.when_full
    }

    /// What the buffer holds now.
    pub fn stats(&self) -> BufferStats {
        let state = self.lock();
        BufferStats {
            records: state.next_seq - state.acked,
            bytes: state.bytes,
            dropped: state.dropped,
        }
    }

    /// Appends records in order; returns how many were dropped to respect `max_bytes` (old
    /// ones with `drop_oldest`, these with `drop_newest`).
    pub fn append<'a>(
        &self,
        records: impl IntoIterator<Item = (Option<&'a [u8]>, &'a [u8])>,
    ) -> Result<u64, BufferError> {
        let mut state = self.lock();
        let mut dropped = 0;
        let mut pending: Vec<u8> = Vec::new();
        for (key, value) in records {
            let len = frame_len(key, value);
            if len > self.config.max_bytes {
                dropped += 1;
                continue;
            }
            let mut pending_len = pending.len() as u64;
            // Start a new segment when the current one is full (or there is none).
            let full = state.segments.back().is_none_or(|segment| {
                segment.bytes + pending_len + len > self.config.segment_bytes && segment.records > 0
            });
            if full || state.writer.is_none() {
                self.write_pending(&mut state, &mut pending)?;
                pending_len = 0;
                self.start_segment(&mut state)?;
            }
            while state.bytes + pending_len + len > self.config.max_bytes {
                match self.config.when_full {
                    WhenFull::DropNewest => break,
                    WhenFull::DropOldest => {
                        if state.segments.len() <= 1 {
                            break;
                        }
                        dropped += self.drop_oldest(&mut state)?;
                    }
                }
            }
            if state.bytes + pending_len + len > self.config.max_bytes {
                dropped += 1;
                continue;
            }
            encode(&mut pending, key, value);
            if let Some(segment) = state.segments.back_mut() {
                segment.records += 1;
                segment.bytes += len;
            }
            state.bytes += len;
            state.next_seq += 1;
        }
        self.write_pending(&mut state, &mut pending)?;
        state.dropped += dropped;
        drop(state);
        self.appended.notify_all();
        Ok(dropped)
    }

    fn write_pending(&self, state: &mut State, pending: &mut Vec<u8>) -> Result<(), BufferError> {
        if pending.is_empty() {
            return Ok(());
        }
        let path = state.segments.back().map(|segment| segment.path.clone()).unwrap_or_default();
        if let Some(writer) = state.writer.as_mut() {
            writer.write_all(pending).map_err(io("cannot append to the buffer segment", &path))?;
            if self.config.fsync {
                writer.sync_data().map_err(io("cannot sync the buffer segment", &path))?;
            }
        }
        pending.clear();
        Ok(())
    }

    fn start_segment(&self, state: &mut State) -> Result<(), BufferError> {
        let path = self.config.dir.join(segment_name(state.next_seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io("cannot create the buffer segment", &path))?;
        state.writer = Some(file);
        state.segments.push_back(Segment { first_seq: state.next_seq, records: 0, bytes: 0, path });
        Ok(())
    }

    /// Deletes the oldest segment; the number of its records not yet delivered.
    fn drop_oldest(&self, state: &mut State) -> Result<u64, BufferError> {
        let Some(oldest) = state.segments.pop_front() else { return Ok(0) };
        let end = oldest.first_seq + oldest.records;
        let lost = end.saturating_sub(state.acked.max(oldest.first_seq));
        fs::remove_file(&oldest.path)
            .map_err(io("cannot delete the buffer segment", &oldest.path))?;
        state.bytes -= oldest.bytes;
        state.acked = state.acked.max(end);
        state.read = state.read.max(end);
        let acked = state.acked;
        state.done.retain(|seq, ()| *seq >= acked);
        if state.loaded.as_ref().is_some_and(|(first, _)| *first == oldest.first_seq) {
            state.loaded = None;
        }
        self.write_cursor(state)?;
        Ok(lost)
    }

    /// Up to `max` records from the read position, oldest first; waits up to `wait` when there
    /// are none.
    pub fn next(&self, max: usize, wait: Duration) -> Result<Vec<Record>, BufferError> {
        let mut state = self.lock();
        if state.read >= state.next_seq && !wait.is_zero() {
            state =
                self.appended.wait_timeout(state, wait).unwrap_or_else(PoisonError::into_inner).0;
        }
        let mut out = Vec::new();
        while out.len() < max && state.read < state.next_seq {
            let read = state.read;
            let Some(segment) = state.segments.iter().find(|segment| {
                segment.first_seq <= read && read < segment.first_seq + segment.records
            }) else {
                break;
            };
            let (first, path) = (segment.first_seq, segment.path.clone());
            let stale = state.loaded.as_ref().is_none_or(|(loaded, records)| {
                *loaded != first || (read - first) as usize >= records.len()
            });
            if stale {
                // Appends go to the OS at once: what `next_seq` counts is in the file.
                if let Some(writer) = state.writer.as_mut() {
                    let _ = writer.flush();
                }
                let mut bytes = Vec::new();
                File::open(&path)
                    .and_then(|mut file| file.read_to_end(&mut bytes))
                    .map_err(io("cannot read the buffer segment", &path))?;
                state.loaded = Some((first, decode(&bytes, first).0));
            }
            let Some((_, records)) = state.loaded.as_ref() else { break };
            let Some(record) = records.get((read - first) as usize) else { break };
            out.push(record.clone());
            state.read += 1;
        }
        Ok(out)
    }

    /// Record `seq` was delivered: the cursor moves over every delivered prefix, and segments
    /// delivered entirely are deleted.
    pub fn ack(&self, seq: u64) -> Result<(), BufferError> {
        let mut state = self.lock();
        if seq < state.acked {
            return Ok(());
        }
        state.done.insert(seq, ());
        loop {
            let acked = state.acked;
            if state.done.remove(&acked).is_none() {
                break;
            }
            state.acked += 1;
        }
        let mut deleted = false;
        while let Some(oldest) = state.segments.front() {
            let end = oldest.first_seq + oldest.records;
            let writing = state.segments.len() == 1;
            if end > state.acked || writing {
                break;
            }
            if let Some(oldest) = state.segments.pop_front() {
                fs::remove_file(&oldest.path)
                    .map_err(io("cannot delete the buffer segment", &oldest.path))?;
                state.bytes -= oldest.bytes;
                if state.loaded.as_ref().is_some_and(|(first, _)| *first == oldest.first_seq) {
                    state.loaded = None;
                }
                deleted = true;
            }
        }
        if deleted || state.cursor_written.elapsed() >= CURSOR_INTERVAL {
            self.write_cursor(&mut state)?;
        }
        Ok(())
    }

    /// Hands out again everything not delivered (after a failed delivery or a reconnect).
    pub fn rewind(&self) {
        let mut state = self.lock();
        state.read = state.acked;
        state.done.clear();
    }

    /// Writes the cursor now (at close).
    pub fn sync(&self) -> Result<(), BufferError> {
        let mut state = self.lock();
        self.write_cursor(&mut state)
    }

    fn write_cursor(&self, state: &mut State) -> Result<(), BufferError> {
        state.cursor_written = Instant::now();
        if state.cursor_value == state.acked {
            return Ok(());
        }
        let path = self.config.dir.join("cursor");
        let temp = self.config.dir.join("cursor.tmp");
        fs::write(&temp, state.acked.to_string())
            .map_err(io("cannot write the buffer cursor", &temp))?;
        fs::rename(&temp, &path).map_err(io("cannot write the buffer cursor", &path))?;
        state.cursor_value = state.acked;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, max_bytes: u64, segment_bytes: u64, when_full: WhenFull) -> BufferConfig {
        BufferConfig { dir: dir.to_owned(), max_bytes, segment_bytes, when_full, fsync: false }
    }

    fn values(records: &[Record]) -> Vec<String> {
        records.iter().map(|record| String::from_utf8_lossy(&record.value).into_owned()).collect()
    }

    #[test]
    fn records_come_back_in_order_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let buffer =
            DiskBuffer::open(config(dir.path(), 1 << 20, 64, WhenFull::DropOldest)).expect("open");
        let items: Vec<String> = (0..20).map(|index| format!("value-{index}")).collect();
        let dropped = buffer
            .append(items.iter().map(|item| (Some(b"dev".as_slice()), item.as_bytes())))
            .expect("append");
        assert_eq!(dropped, 0);
        let first = buffer.next(5, Duration::ZERO).expect("next");
        assert_eq!(values(&first), items[..5]);
        assert_eq!(first[0].key.as_deref(), Some(b"dev".as_slice()));
        for record in &first {
            buffer.ack(record.seq).expect("ack");
        }
        buffer.sync().expect("sync");
        // Handed out but not delivered: they come again after a restart.
        let _ = buffer.next(3, Duration::ZERO).expect("next");
        drop(buffer);
        let buffer = DiskBuffer::open(config(dir.path(), 1 << 20, 64, WhenFull::DropOldest))
            .expect("reopen");
        assert_eq!(buffer.stats().records, 15);
        let rest = buffer.next(100, Duration::ZERO).expect("next");
        assert_eq!(values(&rest), items[5..]);
        for record in rest.iter().rev() {
            buffer.ack(record.seq).expect("ack out of order");
        }
        assert_eq!(buffer.stats().records, 0);
        let segments = fs::read_dir(dir.path())
            .expect("list")
            .filter(|entry| {
                entry
                    .as_ref()
                    .is_ok_and(|entry| entry.path().extension().is_some_and(|ext| ext == "seg"))
            })
            .count();
        assert_eq!(segments, 1, "delivered segments are deleted, the newest kept");
    }

    #[test]
    fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let buffer = DiskBuffer::open(config(dir.path(), 1 << 20, 1 << 20, WhenFull::DropOldest))
            .expect("open");
        buffer.append([(None, b"one".as_slice()), (None, b"two".as_slice())]).expect("append");
        drop(buffer);
        let path = dir.path().join(segment_name(0));
        let mut file = OpenOptions::new().append(true).open(&path).expect("segment");
        file.write_all(&[9, 0, 0, 0, 1]).expect("torn write");
        drop(file);
        let buffer = DiskBuffer::open(config(dir.path(), 1 << 20, 1 << 20, WhenFull::DropOldest))
            .expect("reopen");
        assert_eq!(values(&buffer.next(10, Duration::ZERO).expect("next")), ["one", "two"]);
        buffer.append([(None, b"three".as_slice())]).expect("append after repair");
        assert_eq!(values(&buffer.next(10, Duration::ZERO).expect("next")), ["three"]);
    }

    #[test]
    fn a_full_buffer_drops_by_its_policy() {
        let item = [7u8; 20]; // 32 bytes framed
        let dir = tempfile::tempdir().expect("tempdir");
        let buffer =
            DiskBuffer::open(config(dir.path(), 320, 64, WhenFull::DropOldest)).expect("open");
        let dropped = buffer.append((0..20).map(|_| (None, item.as_slice()))).expect("append");
        let stats = buffer.stats();
        assert!(stats.bytes <= 320, "{stats:?}");
        assert_eq!(dropped, 20 - stats.records);
        assert!(dropped > 0);
        // The newest records are kept.
        let kept = buffer.next(100, Duration::ZERO).expect("next");
        assert_eq!(kept.last().map(|record| record.seq), Some(19));

        let dir = tempfile::tempdir().expect("tempdir");
        let buffer =
            DiskBuffer::open(config(dir.path(), 320, 64, WhenFull::DropNewest)).expect("open");
        let dropped = buffer.append((0..20).map(|_| (None, item.as_slice()))).expect("append");
        assert_eq!(dropped, 10);
        let kept = buffer.next(100, Duration::ZERO).expect("next");
        assert_eq!(kept.first().map(|record| record.seq), Some(0));
        assert_eq!(kept.len(), 10);
    }
}
