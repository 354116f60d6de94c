//! File names inside a cache directory: entries, temporary files, the lock file, the journal
//! and the index snapshot. The families cannot collide: entries end in `.chia`, temporary files
//! in `.tmp`, journals in `.log`, and the lock file and the snapshot are fixed names ending in
//! `.lock` and `.snapshot`.

use std::ffi::OsStr;

use sha2::{Digest, Sha256};

/// Extension of entry files.
pub const ENTRY_EXTENSION: &str = "chia";
const ENTRY_SUFFIX: &str = ".chia";
/// Characters of the tag kept in the readable part of an entry name.
const SLUG_MAX_CHARS: usize = 80;
/// Hex digits of SHA-256(tag) appended so distinct tags with the same slug do not collide.
const DIGEST_HEX_DIGITS: usize = 16;

/// Files being written (renamed into place when complete) and entries being deleted (renamed
/// here first, so that the deletion cannot hit a newer file of the same name). Anything with
/// this shape at open is a leftover of an interrupted process and is removed.
const TEMP_PREFIX: &str = ".chia-tmp-";
const TEMP_SUFFIX: &str = ".tmp";

/// Held with `flock` while a store has the directory open.
pub(crate) const LOCK_FILE_NAME: &str = ".chia-cache.lock";

/// The index snapshot (see `snapshot.rs`).
pub(crate) const SNAPSHOT_FILE_NAME: &str = ".chia-index.snapshot";

/// Journals are `.chia-journal-<generation>.log` (see `journal.rs`).
const JOURNAL_PREFIX: &str = ".chia-journal-";
const JOURNAL_SUFFIX: &str = ".log";

/// Deterministic, filesystem-safe file name of `tag`'s entry: `<slug>_<hash>.chia`, where the
/// slug is the tag with every character outside `[A-Za-z0-9._-]` replaced by `_`, cut at 80
/// characters, and the hash the first 16 hex digits of SHA-256 of the tag's UTF-8 bytes (the
/// original's name, with `.chia` instead of `.pkl`).
///
/// ```
/// assert_eq!(chia_cache::entry_file_name("iter0/run 1"), "iter0_run_1_cdf57941b29d67d4.chia");
/// ```
pub fn entry_file_name(tag: &str) -> String {
    name_with_digest(tag, name_digest(tag))
}

fn slug_chars(tag: &str) -> impl Iterator<Item = char> + '_ {
    tag.chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .take(SLUG_MAX_CHARS)
}

/// The first 16 hex digits of SHA-256(tag) that end `tag`'s file name, as a number.
pub(crate) fn name_digest(tag: &str) -> u64 {
    let digest = Sha256::digest(tag.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// `tag`'s file name, given its [`name_digest`].
pub(crate) fn name_with_digest(tag: &str, digest: u64) -> String {
    let slug: String = slug_chars(tag).collect();
    format!("{slug}_{digest:0width$x}{ENTRY_SUFFIX}", width = DIGEST_HEX_DIGITS)
}

/// The digest an entry file name ends with (`…_<16 hex digits>.chia`), if it has that shape.
pub(crate) fn digest_of_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(ENTRY_SUFFIX)?;
    let split = stem.len().checked_sub(DIGEST_HEX_DIGITS + 1)?;
    let (slug_and_underscore, hex) = stem.split_at_checked(split + 1)?;
    if !slug_and_underscore.ends_with('_')
        || !hex.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Whether `name` is the file name of `tag` whose digest is `digest` (already known to end
/// `name`): whether the rest of `name` is `tag`'s slug. Allocates nothing.
pub(crate) fn is_name_of(name: &str, tag: &str, digest: u64) -> bool {
    if digest_of_name(name) != Some(digest) {
        return false;
    }
    let slug_part = &name[..name.len() - ENTRY_SUFFIX.len() - DIGEST_HEX_DIGITS - 1];
    let mut expected = slug_chars(tag);
    let mut found = slug_part.chars();
    loop {
        match (expected.next(), found.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// The file name of the journal of generation `generation`.
pub(crate) fn journal_file_name(generation: u64) -> String {
    format!("{JOURNAL_PREFIX}{generation}{JOURNAL_SUFFIX}")
}

/// A temporary name unique within this process; the directory lock makes it unique overall.
pub(crate) fn temp_file_name(sequence: u64) -> String {
    format!("{TEMP_PREFIX}{}-{sequence}{TEMP_SUFFIX}", std::process::id())
}

/// What a name found in the cache directory is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FileKind {
    Entry,
    Temp,
    Lock,
    Snapshot,
    /// A journal, with its generation.
    Journal(u64),
    Foreign,
}

pub(crate) fn classify(name: &OsStr) -> FileKind {
    let Some(name) = name.to_str() else { return FileKind::Foreign };
    if name == LOCK_FILE_NAME {
        FileKind::Lock
    } else if name == SNAPSHOT_FILE_NAME {
        FileKind::Snapshot
    } else if let Some(generation) = name
        .strip_prefix(JOURNAL_PREFIX)
        .and_then(|rest| rest.strip_suffix(JOURNAL_SUFFIX))
        .and_then(|number| number.parse().ok())
    {
        FileKind::Journal(generation)
    } else if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
        FileKind::Temp
    } else if name.ends_with(ENTRY_SUFFIX) {
        FileKind::Entry
    } else {
        FileKind::Foreign
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_replaces_each_character_outside_the_safe_set() {
        let name = entry_file_name("a/b c:é.d-e_f");
        assert!(name.starts_with("a_b_c__.d-e_f_"), "{name}");
    }

    #[test]
    fn slug_is_cut_at_80_characters_and_hash_keeps_long_tags_apart() {
        let long_a = format!("{}a", "x".repeat(100));
        let long_b = format!("{}b", "x".repeat(100));
        let (name_a, name_b) = (entry_file_name(&long_a), entry_file_name(&long_b));
        assert_eq!(name_a.len(), 80 + 1 + 16 + ".chia".len());
        assert_eq!(name_a[..81], name_b[..81]);
        assert_ne!(name_a, name_b);
    }

    #[test]
    fn names_match_the_original_python_scheme() {
        // hashlib.sha256(b"iter0").hexdigest()[:16] == "94f05f04b20f5aa4"
        assert_eq!(entry_file_name("iter0"), "iter0_94f05f04b20f5aa4.chia");
    }

    #[test]
    fn entries_temp_files_and_the_lock_are_told_apart() {
        assert_eq!(classify(OsStr::new(&entry_file_name(".chia-tmp-x.tmp"))), FileKind::Entry);
        assert_eq!(classify(OsStr::new(&temp_file_name(7))), FileKind::Temp);
        assert_eq!(classify(OsStr::new(LOCK_FILE_NAME)), FileKind::Lock);
        assert_eq!(classify(OsStr::new("old_cache_0123456789abcdef.pkl")), FileKind::Foreign);
        assert_eq!(classify(OsStr::new(SNAPSHOT_FILE_NAME)), FileKind::Snapshot);
        assert_eq!(classify(OsStr::new(&journal_file_name(12))), FileKind::Journal(12));
        assert_eq!(classify(OsStr::new(".chia-journal-x.log")), FileKind::Foreign);
    }

    #[test]
    fn digests_round_trip_through_names() {
        for tag in ["iter0", "", "a/b c:é", &"x".repeat(200), "ends_in_0123456789abcdef"] {
            let name = entry_file_name(tag);
            let digest = name_digest(tag);
            assert_eq!(digest_of_name(&name), Some(digest), "{name}");
            assert!(is_name_of(&name, tag, digest), "{name}");
            assert!(!is_name_of(&name, &format!("y{tag}"), digest), "{name}");
            assert!(!is_name_of(&format!("x{name}"), tag, digest), "{name}");
        }
        assert_eq!(digest_of_name("iter0_94f05f04b20f5aa4.chia"), Some(0x94f0_5f04_b20f_5aa4));
        assert_eq!(digest_of_name("iter0_94F05F04B20F5AA4.chia"), None);
        assert_eq!(digest_of_name("94f05f04b20f5aa4.chia"), None);
        assert_eq!(digest_of_name("notes.chia"), None);
    }
}
