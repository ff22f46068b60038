//! Server → client WebSocket frames, encoded by the edge itself (RFC 6455, section 5.2).
//!
//! A server's frames are not masked, so a text frame is the same bytes on every socket that
//! sends it: an event is framed once when it is rendered ([`Framed`]) and each session's writer
//! copies those bytes into its socket's buffer, with no per-session framing at all. The frames
//! a session writes (events, replies, pings, its close) are all encoded here; tungstenite only
//! parses what the client sends (and answers its pings and its close, see `socket.rs`).

use bytes::{BufMut, Bytes, BytesMut};

pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;

/// A close frame's reason is at most this long (a control frame's payload is at most 125
/// bytes, two of which are the code).
const MAX_CLOSE_REASON: usize = 123;

/// A complete text frame (header and payload), built once and shared by every session that
/// sends it. Cloning it costs a reference count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Framed(Bytes);

impl Framed {
    /// The text frame carrying `payload`.
    pub fn text(payload: &str) -> Framed {
        let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
        put_header(&mut out, OP_TEXT, payload.len());
        out.put_slice(payload.as_bytes());
        Framed(out.freeze())
    }

    /// The frame's bytes, as written to a socket.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The text the frame carries.
    pub fn as_str(&self) -> &str {
        let payload = &self.0[header_len_of(&self.0)..];
        // Built from a `&str` in `Framed::text`, so always UTF-8; checked rather than assumed.
        std::str::from_utf8(payload).unwrap_or_default()
    }

    /// The length of the text the frame carries.
    pub fn text_len(&self) -> usize {
        self.0.len() - header_len_of(&self.0)
    }
}

/// The header of a final, unmasked frame of `opcode` with a payload of `len` bytes.
pub(crate) fn put_header(out: &mut impl BufMut, opcode: u8, len: usize) {
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// Bytes of the header of a payload of `len` bytes.
fn header_len(len: usize) -> usize {
    match len {
        0..126 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Bytes of the header at the start of `frame` (an unmasked frame).
fn header_len_of(frame: &[u8]) -> usize {
    match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
}

/// Appends a close frame with `code` and `reason` (cut, on a character boundary, to what a
/// control frame can carry).
pub(crate) fn put_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason[..end];
    put_header(out, OP_CLOSE, 2 + reason.len());
    out.put_u16(code);
    out.put_slice(reason.as_bytes());
}

/// The unmasked frames laid end to end in `bytes`, as (opcode, length of the frame): a frame cut
/// short ends the walk.
pub(crate) fn walk(bytes: &[u8]) -> impl Iterator<Item = (u8, usize)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let rest = bytes.get(at..)?;
        let (&first, &second) = (rest.first()?, rest.get(1)?);
        let (header, len) = match second & 0x7F {
            126 => (
                4,
                usize::from(u16::from_be_bytes(rest.get(2..4)?.try_into().ok()?)),
            ),
            127 => (
                10,
                u64::from_be_bytes(rest.get(2..10)?.try_into().ok()?) as usize,
            ),
            n => (2, usize::from(n)),
        };
        let whole = header + len;
        if rest.len() < whole {
            return None;
        }
        at += whole;
        Some((first & 0x0F, whole))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
    use tungstenite::protocol::frame::FrameHeader;

    /// Each of our headers reads back, through tungstenite's own parser, as a final unmasked
    /// frame of the right kind and length, at each of the three length encodings' edges.
    #[test]
    fn headers_read_back_through_tungstenite() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 1 << 20] {
            let text = "x".repeat(len);
            let framed = Framed::text(&text);
            let mut cursor = std::io::Cursor::new(framed.bytes().to_vec());
            let (header, length) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(header.is_final);
            assert_eq!(header.opcode, OpCode::Data(Data::Text));
            assert!(header.mask.is_none());
            assert_eq!(length as usize, len);
            assert_eq!(cursor.position() as usize + len, framed.bytes().len());
            assert_eq!(framed.as_str(), text);
            assert_eq!(framed.text_len(), len);
        }
    }

    #[test]
    fn a_close_reason_is_cut_on_a_character_boundary() {
        let mut out = Vec::new();
        put_close(&mut out, 4008, &"é".repeat(100));
        let mut cursor = std::io::Cursor::new(out.clone());
        let (header, length) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        assert_eq!(header.opcode, OpCode::Control(Control::Close));
        assert!(length <= 125, "{length}");
        let payload = &out[cursor.position() as usize..];
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 4008);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
        assert_eq!(payload.len(), 2 + 122, "61 two-byte characters");
    }

    #[test]
    fn a_walk_finds_each_whole_frame() {
        let mut bytes = Vec::new();
        put_header(&mut bytes, 0xA, 3);
        bytes.extend_from_slice(b"pon");
        bytes.extend_from_slice(Framed::text(&"y".repeat(300)).bytes());
        put_close(&mut bytes, 1000, "");
        let frames: Vec<_> = walk(&bytes).collect();
        assert_eq!(frames, vec![(0xA, 5), (OP_TEXT, 304), (OP_CLOSE, 4)]);
        // A frame cut short is not reported.
        assert_eq!(walk(&bytes[..bytes.len() - 1]).count(), 2);
    }
}
