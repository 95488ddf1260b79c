//! Record framing for segment files: pure encode/decode, no I/O.
//!
//! Like mini-redis's `frame.rs`, this module only turns records into bytes and
//! bytes back into records; `log.rs` does the file work. Keeping it pure makes
//! the tricky cases (torn writes, zero-filled tails, absurd lengths, bit flips)
//! testable without a disk and fuzzable later.
//!
//! # Frame layout
//!
//! All integers little-endian; a segment file is just frames back to back.
//!
//! ```text
//! +---------+-----------+------------+--------------------+-------------+
//! | len u32 | crc32c u32| offset u64 | append_time_ms u64 | payload ... |
//! +---------+-----------+------------+--------------------+-------------+
//!  0         4           8            16                   24
//! ```
//!
//! * `len` counts the bytes after the 8-byte `len`+`crc` prefix:
//!   `16 + payload.len()`. It must lie in `16..=16 + MAX_PAYLOAD`, so a corrupt
//!   length is rejected before anything is allocated or read for it.
//! * `crc` is CRC-32C (Castagnoli) over the `len` bytes followed by everything
//!   after the `crc` field (offset, time, payload). Covering `len` too means a
//!   flipped length bit is caught even when the new length happens to be valid.
//! * A zero `len` is never valid; it is what a preallocated or torn
//!   (zero-filled) tail looks like, and is reported as
//!   [`CorruptKind::ZeroLength`] so recovery treats it as the end of the log.

use std::fmt;

/// Bytes before the payload: len (4) + crc (4) + offset (8) + append time (8).
pub const HEADER_LEN: usize = 24;

/// Bytes covered by `len` before the payload: offset (8) + append time (8).
const LEN_OVERHEAD: usize = 16;

/// Largest payload a frame may carry (64 MiB). It bounds what a corrupt
/// length field can make a reader allocate.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// One decoded frame, borrowing its payload from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The record's log offset.
    pub offset: u64,
    /// Milliseconds since the Unix epoch when the record was appended.
    pub append_time_ms: u64,
    /// The opaque record payload.
    pub payload: &'a [u8],
}

/// Why a frame is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptKind {
    /// The length field is zero: a zero-filled (preallocated or torn) tail.
    ZeroLength,
    /// The length field is outside `16..=16 + MAX_PAYLOAD`.
    BadLength(u32),
    /// The stored checksum does not match the frame's bytes.
    Checksum {
        /// Checksum stored in the frame.
        stored: u32,
        /// Checksum computed over the frame's bytes.
        computed: u32,
    },
}

impl fmt::Display for CorruptKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CorruptKind::ZeroLength => {
                f.write_str("zero length field (zero-filled or preallocated tail)")
            }
            CorruptKind::BadLength(len) => write!(
                f,
                "length field {len} out of range (valid: {}..={})",
                LEN_OVERHEAD,
                LEN_OVERHEAD + MAX_PAYLOAD
            ),
            CorruptKind::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
        }
    }
}

/// Result of decoding the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid frame and how many bytes it used.
    Complete(Frame<'a>, usize),
    /// The buffer ends before the frame does: read more (or, at the end of a
    /// file, a torn write).
    Incomplete,
    /// The bytes at the start of the buffer are not a valid frame.
    Corrupt(CorruptKind),
}

/// Bytes a frame with a payload of `payload_len` bytes takes on disk.
pub fn encoded_len(payload_len: usize) -> usize {
    HEADER_LEN + payload_len
}

/// Appends one frame to `buf`.
///
/// The caller checks `payload.len() <= MAX_PAYLOAD` first (the log returns a
/// typed error for it); a larger payload would produce a frame `decode`
/// rejects.
pub fn encode_into(buf: &mut Vec<u8>, offset: u64, append_time_ms: u64, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let len = (LEN_OVERHEAD + payload.len()) as u32;
    let start = buf.len();
    buf.reserve(HEADER_LEN + payload.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc, filled in below
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&append_time_ms.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), &buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Total frame length announced by the header at the start of `buf`, if at
/// least the length field is present and in range. Lets a reader size its
/// buffer for a frame larger than its usual chunk.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let len = read_u32(buf, 0)? as usize;
    (LEN_OVERHEAD..=LEN_OVERHEAD + MAX_PAYLOAD)
        .contains(&len)
        .then_some(8 + len)
}

/// The append time in the header at the start of `buf`, without verifying
/// the checksum. Only for choosing where to start a scan (`scan_recent`);
/// records handed to callers always go through [`decode`].
pub fn peek_append_time(buf: &[u8]) -> Option<u64> {
    frame_len(buf)?;
    read_u64(buf, 16)
}

/// Decodes the frame at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    let Some(len) = read_u32(buf, 0) else {
        return Decoded::Incomplete;
    };
    if len == 0 {
        return Decoded::Corrupt(CorruptKind::ZeroLength);
    }
    let body_len = len as usize;
    if !(LEN_OVERHEAD..=LEN_OVERHEAD + MAX_PAYLOAD).contains(&body_len) {
        return Decoded::Corrupt(CorruptKind::BadLength(len));
    }
    let total = 8 + body_len;
    let Some(frame) = buf.get(..total) else {
        return Decoded::Incomplete;
    };
    let stored = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&frame[..4]), &frame[8..]);
    if stored != computed {
        return Decoded::Corrupt(CorruptKind::Checksum { stored, computed });
    }
    let (Some(offset), Some(append_time_ms)) = (read_u64(frame, 8), read_u64(frame, 16)) else {
        // Unreachable: body_len >= 16 guarantees both fields are present.
        return Decoded::Incomplete;
    };
    Decoded::Complete(
        Frame {
            offset,
            append_time_ms,
            payload: &frame[HEADER_LEN..],
        },
        total,
    )
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = buf.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(offset: u64, time: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_into(&mut buf, offset, time, payload);
        buf
    }

    #[test]
    fn roundtrip_single_and_many() {
        let mut buf = Vec::new();
        for i in 0..100u64 {
            let payload = vec![i as u8; i as usize];
            encode_into(&mut buf, 1000 + i, 5000 + i, &payload);
        }
        let mut pos = 0;
        for i in 0..100u64 {
            match decode(&buf[pos..]) {
                Decoded::Complete(f, used) => {
                    assert_eq!(f.offset, 1000 + i);
                    assert_eq!(f.append_time_ms, 5000 + i);
                    assert_eq!(f.payload, vec![i as u8; i as usize].as_slice());
                    assert_eq!(used, encoded_len(i as usize));
                    assert_eq!(frame_len(&buf[pos..]), Some(used));
                    assert_eq!(peek_append_time(&buf[pos..]), Some(5000 + i));
                    pos += used;
                }
                other => panic!("record {i}: {other:?}"),
            }
        }
        assert_eq!(pos, buf.len());
        assert_eq!(decode(&buf[pos..]), Decoded::Incomplete);
    }

    #[test]
    fn empty_payload_is_valid() {
        let buf = frame(7, 8, b"");
        assert_eq!(buf.len(), HEADER_LEN);
        assert!(matches!(decode(&buf), Decoded::Complete(f, 24) if f.payload.is_empty()));
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let buf = frame(1, 2, b"hello world");
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Decoded::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn zero_filled_tail_is_detected() {
        assert_eq!(
            decode(&[0u8; 64]),
            Decoded::Corrupt(CorruptKind::ZeroLength)
        );
        assert_eq!(decode(&[0u8; 4]), Decoded::Corrupt(CorruptKind::ZeroLength));
        assert_eq!(frame_len(&[0u8; 64]), None);
    }

    #[test]
    fn absurd_lengths_are_rejected_without_waiting_for_data() {
        let mut buf = frame(1, 2, b"x");
        buf[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&buf),
            Decoded::Corrupt(CorruptKind::BadLength(u32::MAX))
        );
        buf[..4].copy_from_slice(&15u32.to_le_bytes());
        assert_eq!(decode(&buf), Decoded::Corrupt(CorruptKind::BadLength(15)));
        let too_big = (LEN_OVERHEAD + MAX_PAYLOAD + 1) as u32;
        buf[..4].copy_from_slice(&too_big.to_le_bytes());
        assert!(matches!(
            decode(&buf),
            Decoded::Corrupt(CorruptKind::BadLength(_))
        ));
    }

    #[test]
    fn any_single_bit_flip_is_detected() {
        let original = frame(42, 43, b"some payload bytes");
        for byte in 0..original.len() {
            for bit in 0..8 {
                let mut buf = original.clone();
                buf[byte] ^= 1 << bit;
                let result = decode(&buf);
                assert!(
                    !matches!(result, Decoded::Complete(..)),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn corrupt_kinds_explain_themselves() {
        let text = CorruptKind::Checksum {
            stored: 1,
            computed: 2,
        }
        .to_string();
        assert!(text.contains("checksum mismatch"), "{text}");
        assert!(CorruptKind::ZeroLength.to_string().contains("zero"));
        assert!(CorruptKind::BadLength(3).to_string().contains('3'));
    }
}
