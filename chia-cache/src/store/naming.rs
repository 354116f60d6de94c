//! File names inside a cache directory: entries, temporary files and the lock file. The three
//! families cannot collide: entries end in `.chia`, temporary files in `.tmp`, and the lock
//! file is one fixed name ending in `.lock`.

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

/// Deterministic, filesystem-safe file name of `tag`'s entry: `<slug>_<hash>.chia`, where the
/// slug is the tag with every character outside `[A-Za-z0-9._-]` replaced by `_`, cut at 80
/// characters, and the hash the first 16 hex digits of SHA-256 of the tag's UTF-8 bytes (the
/// original's name, with `.chia` instead of `.pkl`).
///
/// ```
/// assert_eq!(chia_cache::entry_file_name("iter0/run 1"), "iter0_run_1_cdf57941b29d67d4.chia");
/// ```
pub fn entry_file_name(tag: &str) -> String {
    let slug: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .take(SLUG_MAX_CHARS)
        .collect();
    let digest = Sha256::digest(tag.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{slug}_{}{ENTRY_SUFFIX}", &hex[..DIGEST_HEX_DIGITS])
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
    Foreign,
}

pub(crate) fn classify(name: &OsStr) -> FileKind {
    let Some(name) = name.to_str() else { return FileKind::Foreign };
    if name == LOCK_FILE_NAME {
        FileKind::Lock
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
    }
}
