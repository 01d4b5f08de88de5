//! The test frame: an Ethernet frame of EtherType 0x88b5 (IEEE local
//! experimental) whose payload is a header, a pattern derived from the
//! sequence number and a CRC-32 over both. A corrupted byte anywhere after
//! the MAC addresses shows as a CRC mismatch; a frame delivered to the
//! wrong sender shows as a foreign stream.

pub const ETHERTYPE: u16 = 0x88b5;
pub const MAGIC: [u8; 4] = *b"ALWF";
pub const ETH_HDR: usize = 14;
/// magic 4, kind 1, flags 1, stream 2, seq 4, len 2, reserved 2.
pub const HDR: usize = 16;
pub const CRC: usize = 4;
/// The largest payload that keeps the frame within a 1514-byte MTU frame.
pub const MAX_PAYLOAD: usize = 1514 - ETH_HDR - HDR - CRC;

pub const KIND_REQUEST: u8 = 1;
pub const KIND_REPLY: u8 = 2;
/// Set by the reflector when the request it answers failed its CRC.
pub const FLAG_BAD_REQUEST: u8 = 1;

pub type Mac = [u8; 6];

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}
static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE 802.3 polynomial, as zlib computes it).
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Payload length for a sequence number: sizes spread over 32..=1432
/// bytes, so frames cross page and descriptor-buffer boundaries.
pub fn payload_len(seq: u32) -> usize {
    32 + (seq as usize).wrapping_mul(131) % 1401
}

/// The pattern byte at `i` of frame `seq`'s payload (xorshift of both).
pub fn pattern(seq: u32, i: usize) -> u8 {
    let mut x = (seq as u64) << 32 | i as u64;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d) as u8 ^ (x >> 29) as u8
}

/// A frame's fields, as read from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub dst: Mac,
    pub src: Mac,
    pub kind: u8,
    pub flags: u8,
    pub stream: u16,
    pub seq: u32,
    pub len: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not one of ours (another EtherType or no magic).
    Foreign,
    /// Ours, but the CRC or the length does not hold.
    Corrupt(Option<Header>),
    /// Ours and intact; `pattern_ok` says whether the payload is the pattern.
    Good(Header, bool),
}

/// Writes a whole frame into `buf` (at least 1514 bytes); returns its length.
pub fn build(buf: &mut [u8], h: &Header, payload_from: Option<&[u8]>) -> usize {
    buf[0..6].copy_from_slice(&h.dst);
    buf[6..12].copy_from_slice(&h.src);
    buf[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    let b = &mut buf[ETH_HDR..];
    b[0..4].copy_from_slice(&MAGIC);
    b[4] = h.kind;
    b[5] = h.flags;
    b[6..8].copy_from_slice(&h.stream.to_be_bytes());
    b[8..12].copy_from_slice(&h.seq.to_be_bytes());
    b[12..14].copy_from_slice(&(h.len as u16).to_be_bytes());
    b[14..16].copy_from_slice(&[0, 0]);
    match payload_from {
        Some(p) => b[HDR..HDR + h.len].copy_from_slice(&p[..h.len]),
        None => {
            for (i, x) in b[HDR..HDR + h.len].iter_mut().enumerate() {
                *x = pattern(h.seq, i);
            }
        }
    }
    let crc = crc32(&b[..HDR + h.len]);
    b[HDR + h.len..HDR + h.len + CRC].copy_from_slice(&crc.to_be_bytes());
    ETH_HDR + HDR + h.len + CRC
}

/// Reads a frame (the NIC may have padded it past its length).
pub fn parse(frame: &[u8]) -> Parsed {
    if frame.len() < ETH_HDR + HDR + CRC
        || frame[12..14] != ETHERTYPE.to_be_bytes()
        || frame[ETH_HDR..ETH_HDR + 4] != MAGIC
    {
        return Parsed::Foreign;
    }
    let b = &frame[ETH_HDR..];
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&frame[0..6]);
    src.copy_from_slice(&frame[6..12]);
    let h = Header {
        dst,
        src,
        kind: b[4],
        flags: b[5],
        stream: u16::from_be_bytes([b[6], b[7]]),
        seq: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        len: u16::from_be_bytes([b[12], b[13]]) as usize,
    };
    if h.len > MAX_PAYLOAD || b.len() < HDR + h.len + CRC {
        return Parsed::Corrupt(None);
    }
    let want = u32::from_be_bytes(b[HDR + h.len..HDR + h.len + CRC].try_into().unwrap());
    if crc32(&b[..HDR + h.len]) != want {
        return Parsed::Corrupt(Some(h));
    }
    let pattern_ok = h.len == payload_len(h.seq)
        && b[HDR..HDR + h.len]
            .iter()
            .enumerate()
            .all(|(i, &x)| x == pattern(h.seq, i));
    Parsed::Good(h, pattern_ok)
}

/// The payload bytes of a frame `parse` accepted.
pub fn payload<'a>(frame: &'a [u8], h: &Header) -> &'a [u8] {
    &frame[ETH_HDR + HDR..ETH_HDR + HDR + h.len]
}

pub fn mac_str(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Result<Mac, String> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    let mut m = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "'{s}' is not a MAC address (want xx:xx:xx:xx:xx:xx)"
        ));
    }
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("'{s}' is not a MAC address"))?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(seq: u32) -> Header {
        Header {
            dst: [2, 0, 0, 0, 0, 1],
            src: [2, 0, 0, 0, 0, 2],
            kind: KIND_REQUEST,
            flags: 0,
            stream: 7,
            seq,
            len: payload_len(seq),
        }
    }

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn a_built_frame_parses_back_with_its_pattern() {
        let mut buf = [0u8; 1514];
        for seq in [0, 1, 2, 1000, u32::MAX] {
            let n = build(&mut buf, &req(seq), None);
            assert!(n <= 1514);
            assert_eq!(parse(&buf[..n]), Parsed::Good(req(seq), true));
        }
    }

    #[test]
    fn padding_after_the_crc_is_ignored() {
        let mut buf = [0u8; 1514];
        let n = build(&mut buf, &req(3), None);
        assert!(matches!(parse(&buf[..n + 20]), Parsed::Good(_, true)));
    }

    #[test]
    fn one_flipped_bit_is_corrupt_and_a_stranger_is_foreign() {
        let mut buf = [0u8; 1514];
        let n = build(&mut buf, &req(5), None);
        buf[ETH_HDR + HDR + 3] ^= 0x10;
        assert_eq!(parse(&buf[..n]), Parsed::Corrupt(Some(req(5))));
        buf[12] = 0x08;
        assert_eq!(parse(&buf[..n]), Parsed::Foreign);
    }

    #[test]
    fn a_reply_keeps_the_request_payload() {
        let mut a = [0u8; 1514];
        let n = build(&mut a, &req(9), None);
        let Parsed::Good(h, _) = parse(&a[..n]) else {
            panic!()
        };
        let mut r = h;
        r.kind = KIND_REPLY;
        (r.dst, r.src) = (h.src, h.dst);
        let mut b = [0u8; 1514];
        let m = build(&mut b, &r, Some(payload(&a[..n], &h)));
        assert_eq!(parse(&b[..m]), Parsed::Good(r, true));
    }

    #[test]
    fn macs_round_trip() {
        let m = parse_mac("52:54:00:a1:00:02").unwrap();
        assert_eq!(mac_str(&m), "52:54:00:a1:00:02");
        assert!(parse_mac("52:54:00").is_err());
    }
}
