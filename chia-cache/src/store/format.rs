//! The entry file format (version 1). All integers are little-endian.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "CHIACHE\0"
//!      8     2  format version (1)
//!     10     2  flags, 0 in version 1
//!     12     4  tag length in bytes (at most MAX_TAG_LEN)
//!     16     8  payload length in bytes
//!     24     4  header checksum: CRC-32 of bytes 0..24 and the tag
//!     28     4  entry checksum: CRC-32 of bytes 0..24, the tag and the payload
//!     32        tag (UTF-8), then the payload
//! ```
//!
//! The header checksum lets a warm start trust the tag and lengths while reading only the
//! first `32 + tag length` bytes; the entry checksum is verified when the entry is read.
//! A file's length must be exactly `32 + tag length + payload length`.

use std::io::{self, Read};

pub(crate) const MAGIC: [u8; 8] = *b"CHIACHE\0";
pub(crate) const FORMAT_VERSION: u16 = 1;
pub(crate) const HEADER_LEN: usize = 32;
/// Longest tag an entry can carry, in bytes. Tags are call labels; the bound keeps a damaged
/// length field from asking for a huge allocation.
pub const MAX_TAG_LEN: usize = 64 * 1024;

/// Bytes an entry of this tag and payload occupies on disk.
pub(crate) fn entry_file_len(tag_len: usize, payload_len: usize) -> u64 {
    HEADER_LEN as u64 + tag_len as u64 + payload_len as u64
}

/// The header and tag bytes of an entry; the payload follows them in the file.
pub(crate) fn encode_prefix(tag: &str, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(&MAGIC);
    header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // 10..12: flags stay 0.
    header[12..16].copy_from_slice(&(tag.len() as u32).to_le_bytes());
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..24]);
    hasher.update(tag.as_bytes());
    let header_checksum = hasher.clone().finalize();
    hasher.update(payload);
    header[24..28].copy_from_slice(&header_checksum.to_le_bytes());
    header[28..32].copy_from_slice(&hasher.finalize().to_le_bytes());

    let mut prefix = Vec::with_capacity(HEADER_LEN + tag.len());
    prefix.extend_from_slice(&header);
    prefix.extend_from_slice(tag.as_bytes());
    prefix
}

/// A validated header and tag, read without touching the payload.
pub(crate) struct EntryPrefix {
    pub tag: String,
    pub payload_len: u64,
    checksum: u32,
    /// CRC state after bytes 0..24 and the tag, so the payload check continues from it.
    hasher_after_tag: crc32fast::Hasher,
}

impl EntryPrefix {
    pub(crate) fn file_len(&self) -> u64 {
        entry_file_len(self.tag.len(), 0) + self.payload_len
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
    /// Not a version-1 entry: another program's file, or a newer format. Leave it alone.
    NotOurs(String),
    /// One of our entries, damaged (truncated, checksum mismatch, ...).
    Damaged(String),
}

/// Reads and validates the header and tag: exactly `32 + tag length` bytes, never the payload.
pub(crate) fn read_prefix(reader: &mut impl Read) -> Result<EntryPrefix, PrefixError> {
    let mut header = [0u8; HEADER_LEN];
    let filled = read_up_to(reader, &mut header).map_err(PrefixError::Io)?;
    let magic_seen = filled.min(MAGIC.len());
    if header[..magic_seen] != MAGIC[..magic_seen] {
        return Err(PrefixError::NotOurs("no chia-cache magic".to_owned()));
    }
    if filled < HEADER_LEN {
        return Err(PrefixError::Damaged(format!("truncated: {filled} of {HEADER_LEN} header bytes")));
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != FORMAT_VERSION {
        return Err(PrefixError::NotOurs(format!(
            "format version {version}; this build reads version {FORMAT_VERSION}"
        )));
    }
    let field_u32 =
        |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let flags = u16::from_le_bytes([header[10], header[11]]);
    let tag_len = field_u32(12) as usize;
    let mut payload_len_bytes = [0u8; 8];
    payload_len_bytes.copy_from_slice(&header[16..24]);
    let payload_len = u64::from_le_bytes(payload_len_bytes);
    let header_checksum = field_u32(24);
    let checksum = field_u32(28);
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
    hasher.update(&header[..24]);
    hasher.update(&tag);
    if hasher.clone().finalize() != header_checksum {
        return Err(PrefixError::Damaged("header checksum mismatch".to_owned()));
    }
    let tag = String::from_utf8(tag).map_err(|_| PrefixError::Damaged("tag is not UTF-8".to_owned()))?;
    Ok(EntryPrefix { tag, payload_len, checksum, hasher_after_tag: hasher })
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
        let mut bytes = encode_prefix(tag, payload);
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
        assert_eq!(bytes.len() as u64, entry_file_len(5, payload.len()));
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
        newer[8] = 2;
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
}
