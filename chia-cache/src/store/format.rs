//! The entry file formats. All integers are little-endian. Version 1, for entries that never
//! expire:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "CHIACHE\0"
//!      8     2  format version (1)
//!     10     2  flags, 0
//!     12     4  tag length in bytes (at most MAX_TAG_LEN)
//!     16     8  payload length in bytes
//!     24     4  header checksum: CRC-32 of bytes 0..24 and the tag
//!     28     4  entry checksum: CRC-32 of bytes 0..24, the tag and the payload
//!     32        tag (UTF-8), then the payload
//! ```
//!
//! Version 2, for entries written with a time to live, adds the expiry before the checksums:
//!
//! ```text
//!      0    24  as in version 1, with format version 2
//!     24     8  expires at: milliseconds since the Unix epoch (never 0)
//!     32     4  header checksum: CRC-32 of bytes 0..32 and the tag
//!     36     4  entry checksum: CRC-32 of bytes 0..32, the tag and the payload
//!     40        tag (UTF-8), then the payload
//! ```
//!
//! Entries without an expiry are still written as version 1, so a build that reads only
//! version 1 still serves them (and skips, without deleting, the version-2 ones).
//!
//! The header checksum lets a warm start trust the tag, lengths and expiry while reading only
//! the header and the tag; the entry checksum is verified when the entry is read. A file's
//! length must be exactly `header length + tag length + payload length`.

use std::io::{self, Read};

pub(crate) const MAGIC: [u8; 8] = *b"CHIACHE\0";
/// Header length of version 1 (no expiry).
pub(crate) const HEADER_LEN: usize = 32;
/// Header length of version 2 (with an expiry).
pub(crate) const HEADER_LEN_V2: usize = 40;
/// Longest tag an entry can carry, in bytes. Tags are call labels; the bound keeps a damaged
/// length field from asking for a huge allocation.
pub const MAX_TAG_LEN: usize = 64 * 1024;

/// The header length of an entry that expires at `expires_at` (0: never).
pub(crate) fn header_len(expires_at: u64) -> usize {
    if expires_at == 0 { HEADER_LEN } else { HEADER_LEN_V2 }
}

/// Bytes an entry of this tag, payload and expiry (0: never) occupies on disk.
pub(crate) fn entry_file_len(tag_len: usize, payload_len: usize, expires_at: u64) -> u64 {
    header_len(expires_at) as u64 + tag_len as u64 + payload_len as u64
}

/// The header and tag bytes of an entry (version 1 if `expires_at` is 0, else version 2);
/// the payload follows them in the file. `spare` more bytes of capacity are reserved, so the
/// caller can append the payload without reallocating.
pub(crate) fn encode_prefix(tag: &str, payload: &[u8], expires_at: u64, spare: usize) -> Vec<u8> {
    let header_len = header_len(expires_at);
    let mut prefix = Vec::with_capacity(header_len + tag.len() + spare);
    prefix.extend_from_slice(&MAGIC);
    let version: u16 = if expires_at == 0 { 1 } else { 2 };
    prefix.extend_from_slice(&version.to_le_bytes());
    prefix.extend_from_slice(&0u16.to_le_bytes());
    prefix.extend_from_slice(&(tag.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    if expires_at != 0 {
        prefix.extend_from_slice(&expires_at.to_le_bytes());
    }
    let fields_end = prefix.len();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&prefix[..fields_end]);
    hasher.update(tag.as_bytes());
    let header_checksum = hasher.clone().finalize();
    hasher.update(payload);
    prefix.extend_from_slice(&header_checksum.to_le_bytes());
    prefix.extend_from_slice(&hasher.finalize().to_le_bytes());
    prefix.extend_from_slice(tag.as_bytes());
    prefix
}

/// A validated header and tag, read without touching the payload.
pub(crate) struct EntryPrefix {
    pub tag: String,
    pub payload_len: u64,
    /// Milliseconds since the Unix epoch; 0 for an entry that never expires (version 1).
    pub expires_at: u64,
    checksum: u32,
    /// CRC state after the header fields and the tag, so the payload check continues from it.
    hasher_after_tag: crc32fast::Hasher,
}

impl EntryPrefix {
    pub(crate) fn file_len(&self) -> u64 {
        entry_file_len(self.tag.len(), 0, self.expires_at) + self.payload_len
    }

    /// True if `payload` is the one the entry was written with.
    pub(crate) fn payload_matches(&self, payload: &[u8]) -> bool {
        let mut hasher = self.hasher_after_tag.clone();
        hasher.update(payload);
        hasher.finalize() == self.checksum
    }
}

/// Why a file's header cannot be used.
#[derive(Debug)]
pub(crate) enum PrefixError {
    /// Reading failed for a reason other than the file ending early.
    Io(io::Error),
    /// Not an entry this build reads: another program's file, or a newer format. Leave it
    /// alone.
    NotOurs(String),
    /// One of our entries, damaged (truncated, checksum mismatch, ...).
    Damaged(String),
}

/// Reads and validates the header and tag: exactly the header and the tag, never the payload.
pub(crate) fn read_prefix(reader: &mut impl Read) -> Result<EntryPrefix, PrefixError> {
    let mut header = [0u8; HEADER_LEN_V2];
    let filled = read_up_to(reader, &mut header[..HEADER_LEN]).map_err(PrefixError::Io)?;
    let magic_seen = filled.min(MAGIC.len());
    if header[..magic_seen] != MAGIC[..magic_seen] {
        return Err(PrefixError::NotOurs("no chia-cache magic".to_owned()));
    }
    if filled < HEADER_LEN {
        return Err(PrefixError::Damaged(format!("truncated: {filled} of {HEADER_LEN} header bytes")));
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    let header_len = match version {
        1 => HEADER_LEN,
        2 => {
            let filled = read_up_to(reader, &mut header[HEADER_LEN..]).map_err(PrefixError::Io)?;
            if filled < HEADER_LEN_V2 - HEADER_LEN {
                return Err(PrefixError::Damaged(format!(
                    "truncated: {} of {HEADER_LEN_V2} header bytes",
                    HEADER_LEN + filled
                )));
            }
            HEADER_LEN_V2
        }
        _ => {
            return Err(PrefixError::NotOurs(format!(
                "format version {version}; this build reads versions 1 and 2"
            )));
        }
    };
    let field_u32 =
        |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let field_u64 = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let flags = u16::from_le_bytes([header[10], header[11]]);
    let tag_len = field_u32(12) as usize;
    let payload_len = field_u64(16);
    let fields_end = header_len - 8;
    let expires_at = if version == 2 { field_u64(24) } else { 0 };
    let header_checksum = field_u32(fields_end);
    let checksum = field_u32(fields_end + 4);
    if flags != 0 {
        return Err(PrefixError::Damaged(format!("unknown flags {flags:#06x}")));
    }
    if tag_len > MAX_TAG_LEN {
        return Err(PrefixError::Damaged(format!("tag length {tag_len} exceeds {MAX_TAG_LEN}")));
    }

    let mut tag = vec![0u8; tag_len];
    reader.read_exact(&mut tag).map_err(|error| match error.kind() {
        io::ErrorKind::UnexpectedEof => PrefixError::Damaged("truncated in the tag".to_owned()),
        _ => PrefixError::Io(error),
    })?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..fields_end]);
    hasher.update(&tag);
    if hasher.clone().finalize() != header_checksum {
        return Err(PrefixError::Damaged("header checksum mismatch".to_owned()));
    }
    if version == 2 && expires_at == 0 {
        return Err(PrefixError::Damaged("version 2 entry without an expiry".to_owned()));
    }
    let tag = String::from_utf8(tag).map_err(|_| PrefixError::Damaged("tag is not UTF-8".to_owned()))?;
    Ok(EntryPrefix { tag, payload_len, expires_at, checksum, hasher_after_tag: hasher })
}

/// Fills `buf` as far as the reader allows; returns how many bytes were read (short only at
/// end of file).
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_bytes(tag: &str, payload: &[u8]) -> Vec<u8> {
        entry_bytes_expiring(tag, payload, 0)
    }

    fn entry_bytes_expiring(tag: &str, payload: &[u8], expires_at: u64) -> Vec<u8> {
        let mut bytes = encode_prefix(tag, payload, expires_at, payload.len());
        bytes.extend_from_slice(payload);
        bytes
    }

    /// A reader that counts what it hands out.
    struct CountingReader<'a> {
        inner: &'a [u8],
        handed_out: usize,
    }

    impl Read for CountingReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let read = self.inner.read(buf)?;
            self.handed_out += read;
            Ok(read)
        }
    }

    #[test]
    fn round_trip_validates_header_and_payload() {
        let payload = b"the payload";
        let bytes = entry_bytes("iter0", payload);
        assert_eq!(bytes.len() as u64, entry_file_len(5, payload.len(), 0));
        let prefix = read_prefix(&mut bytes.as_slice()).expect("valid prefix");
        assert_eq!(prefix.tag, "iter0");
        assert_eq!(prefix.payload_len, payload.len() as u64);
        assert_eq!(prefix.file_len(), bytes.len() as u64);
        assert!(prefix.payload_matches(payload));
        assert!(!prefix.payload_matches(b"the paylOad"));
        assert!(!prefix.payload_matches(b"the payloa"));
    }

    #[test]
    fn reading_the_prefix_never_reads_the_payload() {
        let payload = vec![7u8; 1 << 20];
        let bytes = entry_bytes("a tag", &payload);
        let mut reader = CountingReader { inner: &bytes, handed_out: 0 };
        read_prefix(&mut reader).expect("valid prefix");
        // `read_up_to` asks for exactly the header, `read_exact` exactly the tag.
        assert_eq!(reader.handed_out, HEADER_LEN + "a tag".len());
    }

    #[test]
    fn a_flipped_header_or_tag_byte_is_damage() {
        let bytes = entry_bytes("iter0", b"payload");
        for at in [12, 16, 20, 24, HEADER_LEN + 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x01;
            let error = read_prefix(&mut damaged.as_slice()).err();
            assert!(matches!(error, Some(PrefixError::Damaged(_))), "byte {at}: {error:?}");
        }
    }

    #[test]
    fn foreign_files_and_newer_versions_are_not_ours() {
        let error = read_prefix(&mut b"\x80\x04\x95pickle data".as_slice()).err();
        assert!(matches!(error, Some(PrefixError::NotOurs(_))), "{error:?}");

        let mut newer = entry_bytes("t", b"p");
        newer[8] = 3;
        let error = read_prefix(&mut newer.as_slice()).err();
        assert!(matches!(error, Some(PrefixError::NotOurs(_))), "{error:?}");
    }

    #[test]
    fn a_truncated_header_or_tag_is_damage() {
        let bytes = entry_bytes("a longer tag", b"payload");
        for len in [0, 3, 8, HEADER_LEN - 1, HEADER_LEN + 2] {
            let error = read_prefix(&mut &bytes[..len]).err();
            assert!(matches!(error, Some(PrefixError::Damaged(_))), "length {len}: {error:?}");
        }
    }

    #[test]
    fn version_2_carries_the_expiry_and_is_checked_like_version_1() {
        let payload = b"expiring payload";
        let bytes = entry_bytes_expiring("iter0", payload, 1_700_000_000_123);
        assert_eq!(bytes.len() as u64, entry_file_len(5, payload.len(), 1));
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 2);
        let prefix = read_prefix(&mut bytes.as_slice()).expect("valid prefix");
        assert_eq!((prefix.tag.as_str(), prefix.expires_at), ("iter0", 1_700_000_000_123));
        assert_eq!(prefix.file_len(), bytes.len() as u64);
        assert!(prefix.payload_matches(payload));
        for at in [24, 30, 32, 36, HEADER_LEN_V2 + 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x01;
            let error = read_prefix(&mut damaged.as_slice()).err();
            let caught = matches!(error, Some(PrefixError::Damaged(_)))
                || read_prefix(&mut damaged.as_slice()).is_ok_and(|prefix| !prefix.payload_matches(payload));
            assert!(caught, "byte {at}: {error:?}");
        }
        let error = read_prefix(&mut &bytes[..HEADER_LEN + 3]).err();
        assert!(matches!(error, Some(PrefixError::Damaged(_))), "{error:?}");
    }
}
