//! Helpers shared by the store tests: self-describing payloads, directory inspection, mtimes,
//! and re-running this test binary as a child process.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use chia_cache::{CacheStore, Durability, StoreOptions};

/// Bytes an entry occupies on disk besides its tag and payload.
pub const HEADER_LEN: u64 = 32;

pub fn entry_size(tag: &str, payload_len: usize) -> u64 {
    HEADER_LEN + tag.len() as u64 + payload_len as u64
}

pub fn open(dir: &Path, budget: u64) -> CacheStore {
    CacheStore::open(dir, budget, StoreOptions::default()).expect("open cache store")
}

pub fn open_fast(dir: &Path, budget: u64) -> CacheStore {
    CacheStore::open(dir, budget, StoreOptions::default().with_durability(Durability::None))
        .expect("open cache store")
}

/// A payload that says which tag and version it was written for, and whose filler is derived
/// from both, so a reader can tell a complete value of the right tag from anything else.
/// `len` below the self-description (18 bytes + the tag) is rounded up to it.
pub fn payload(tag: &str, version: u64, len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len.max(header_len(tag)));
    bytes.extend_from_slice(&(tag.len() as u16).to_le_bytes());
    bytes.extend_from_slice(tag.as_bytes());
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&(len as u64).to_le_bytes());
    let mut state = seed(tag, version);
    while bytes.len() < len {
        bytes.push(next_byte(&mut state));
    }
    bytes
}

/// The version `bytes` was written with, if it is a complete payload written for `tag`.
pub fn verify_payload(tag: &str, bytes: &[u8]) -> Result<u64, String> {
    let tag_len =
        usize::from(u16::from_le_bytes(bytes.get(0..2).ok_or("too short")?.try_into().map_err(|_| "len")?));
    let found_tag = bytes.get(2..2 + tag_len).ok_or("too short for its tag")?;
    if found_tag != tag.as_bytes() {
        return Err(format!("written for tag {:?}", String::from_utf8_lossy(found_tag)));
    }
    let field = |at: usize| -> Result<u64, String> {
        let slice = bytes.get(at..at + 8).ok_or("too short for its fields")?;
        Ok(u64::from_le_bytes(slice.try_into().map_err(|_| "field")?))
    };
    let version = field(2 + tag_len)?;
    let len = field(10 + tag_len)? as usize;
    let expected = payload(tag, version, len);
    if bytes.len() != expected.len() {
        return Err(format!("{} bytes, written with {}", bytes.len(), expected.len()));
    }
    if bytes != expected {
        return Err("content differs from what was written".to_owned());
    }
    Ok(version)
}

fn header_len(tag: &str) -> usize {
    2 + tag.len() + 16
}

fn seed(tag: &str, version: u64) -> u64 {
    tag.bytes().fold(version ^ 0x9E37_79B9_7F4A_7C15, |state, byte| {
        (state ^ u64::from(byte)).wrapping_mul(0x100_0000_01B3)
    }) | 1
}

fn next_byte(state: &mut u64) -> u8 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 32) as u8
}

/// A small deterministic generator for test choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// Names in `dir` that are temporary files (written or deleted when a process stopped).
pub fn temp_files(dir: &Path) -> Vec<String> {
    names(dir).into_iter().filter(|name| name.starts_with(".chia-tmp-")).collect()
}

/// Entry files in `dir`.
pub fn entry_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list cache dir")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == chia_cache::ENTRY_EXTENSION))
        .collect();
    files.sort();
    files
}

pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list cache dir")
        .map(|entry| entry.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Sets a file's modification time to `seconds` after an arbitrary fixed instant.
pub fn set_mtime(path: &Path, seconds: u64) {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seconds);
    File::options().write(true).open(path).and_then(|file| file.set_modified(time)).expect("set mtime");
}

/// Starts this test binary again, running only `test_name`, with `env` set so the test takes
/// its child role. Its stdout is piped.
pub fn spawn_child(test_name: &str, env: (&str, &Path)) -> Child {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child test process")
}
