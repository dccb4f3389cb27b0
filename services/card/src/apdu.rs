//! ISO 7816-4 command and response APDUs: short and extended encodings.
//!
//! Command data and response data may carry a PIN, a PUK, a challenge or a cryptogram, so both
//! are wiped on drop and neither `Debug` prints them: only the header, lengths and status word.

use std::fmt;

use zeroize::Zeroizing;

/// Largest data field of a short APDU.
pub const SHORT_MAX_DATA: usize = 255;
/// Largest Le of a short APDU (encoded as 00).
pub const SHORT_MAX_LE: usize = 256;
/// Largest data field of an extended APDU.
pub const EXTENDED_MAX_DATA: usize = 65_535;
/// Largest Le of an extended APDU (encoded as 0000).
pub const EXTENDED_MAX_LE: usize = 65_536;

/// Why bytes are not a well-formed APDU (or a command cannot be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApduError {
    /// Fewer than the 4 header bytes (command) or 2 status bytes (response).
    #[error("APDU too short: {0} bytes")]
    TooShort(usize),
    /// The body does not match any of the ISO 7816-3 cases.
    #[error("malformed APDU body ({0} bytes after the header)")]
    Malformed(usize),
    /// The data field is longer than an extended APDU can carry.
    #[error("command data too long: {0} bytes")]
    DataTooLong(usize),
    /// Le is larger than an extended APDU can ask for.
    #[error("Le too large: {0}")]
    LeTooLarge(usize),
}

/// A command APDU. `data` is wiped when the command is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    /// Class byte.
    pub cla: u8,
    /// Instruction byte.
    pub ins: u8,
    /// Parameter 1.
    pub p1: u8,
    /// Parameter 2.
    pub p2: u8,
    /// Command data (Lc is its length).
    pub data: Zeroizing<Vec<u8>>,
    /// Expected response length; `None` when no data is expected. 256 (short) and 65536
    /// (extended) are "as much as available".
    pub le: Option<usize>,
}

impl Command {
    /// A command without data or Le (ISO case 1).
    pub fn new(cla: u8, ins: u8, p1: u8, p2: u8) -> Self {
        Command {
            cla,
            ins,
            p1,
            p2,
            data: Zeroizing::new(Vec::new()),
            le: None,
        }
    }

    /// Sets the data field (takes ownership, so no extra copy of a secret is left behind).
    pub fn with_data(mut self, data: Vec<u8>) -> Self {
        self.data = Zeroizing::new(data);
        self
    }

    /// Sets Le.
    pub fn with_le(mut self, le: usize) -> Self {
        self.le = Some(le);
        self
    }

    /// True when the command needs the extended encoding.
    pub fn is_extended(&self) -> bool {
        self.data.len() > SHORT_MAX_DATA || self.le.is_some_and(|le| le > SHORT_MAX_LE)
    }

    /// Encodes the command, short when it fits, extended otherwise. The result is zeroizing
    /// because it contains the data field.
    pub fn encode(&self) -> Result<Zeroizing<Vec<u8>>, ApduError> {
        let lc = self.data.len();
        if lc > EXTENDED_MAX_DATA {
            return Err(ApduError::DataTooLong(lc));
        }
        if let Some(le) = self.le
            && le > EXTENDED_MAX_LE
        {
            return Err(ApduError::LeTooLarge(le));
        }
        let mut out = Zeroizing::new(Vec::with_capacity(4 + 3 + lc + 3));
        out.extend_from_slice(&[self.cla, self.ins, self.p1, self.p2]);
        if self.is_extended() {
            if lc > 0 {
                out.push(0);
                out.extend_from_slice(&(lc as u16).to_be_bytes());
                out.extend_from_slice(&self.data);
            }
            if let Some(le) = self.le {
                if lc == 0 {
                    out.push(0);
                }
                // 65536 is encoded as 0000 (the truncating cast does exactly that).
                out.extend_from_slice(&(le as u16).to_be_bytes());
            }
        } else {
            if lc > 0 {
                out.push(lc as u8);
                out.extend_from_slice(&self.data);
            }
            if let Some(le) = self.le {
                // 256 is encoded as 00.
                out.push(le as u8);
            }
        }
        Ok(out)
    }

    /// Parses a command APDU (ISO 7816-3 cases 1, 2S/E, 3S/E, 4S/E). The card side of every
    /// transport calls this on hostile bytes: it never panics and never allocates more than the
    /// input.
    pub fn parse(bytes: &[u8]) -> Result<Command, ApduError> {
        let Some((header, body)) = bytes.split_first_chunk::<4>() else {
            return Err(ApduError::TooShort(bytes.len()));
        };
        let [cla, ins, p1, p2] = *header;
        let malformed = || ApduError::Malformed(body.len());
        let (data, le): (&[u8], Option<usize>) = match body {
            [] => (&[][..], None),
            [le] => (&[][..], Some(short_le(*le))),
            [0, hi, lo] => (&[][..], Some(extended_le(*hi, *lo))),
            [0, hi, lo, rest @ ..] => {
                let lc = usize::from(u16::from_be_bytes([*hi, *lo]));
                if lc == 0 {
                    return Err(malformed());
                }
                match rest.len().checked_sub(lc) {
                    Some(0) => (rest, None),
                    Some(2) => (&rest[..lc], Some(extended_le(rest[lc], rest[lc + 1]))),
                    _ => return Err(malformed()),
                }
            }
            [lc, rest @ ..] => {
                let lc = usize::from(*lc);
                match rest.len().checked_sub(lc) {
                    Some(0) => (rest, None),
                    Some(1) => (&rest[..lc], Some(short_le(rest[lc]))),
                    _ => return Err(malformed()),
                }
            }
        };
        Ok(Command {
            cla,
            ins,
            p1,
            p2,
            data: Zeroizing::new(data.to_vec()),
            le,
        })
    }
}

fn short_le(byte: u8) -> usize {
    if byte == 0 {
        SHORT_MAX_LE
    } else {
        usize::from(byte)
    }
}

fn extended_le(hi: u8, lo: u8) -> usize {
    match u16::from_be_bytes([hi, lo]) {
        0 => EXTENDED_MAX_LE,
        n => usize::from(n),
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("cla", &format_args!("{:02X}", self.cla))
            .field("ins", &format_args!("{:02X}", self.ins))
            .field("p1", &format_args!("{:02X}", self.p1))
            .field("p2", &format_args!("{:02X}", self.p2))
            .field("lc", &self.data.len())
            .field("le", &self.le)
            .finish()
    }
}

/// A status word (SW1 SW2).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusWord(pub u16);

impl StatusWord {
    /// 9000: success.
    pub const OK: StatusWord = StatusWord(0x9000);
    /// 6281: part of the returned data may be corrupted.
    pub const WARNING_CORRUPTED: StatusWord = StatusWord(0x6281);
    /// 6700: wrong length (Lc or Le).
    pub const WRONG_LENGTH: StatusWord = StatusWord(0x6700);
    /// 6982: security status not satisfied (authenticate first).
    pub const SECURITY_STATUS_NOT_SATISFIED: StatusWord = StatusWord(0x6982);
    /// 6983: authentication method blocked (the counter is at zero).
    pub const AUTH_METHOD_BLOCKED: StatusWord = StatusWord(0x6983);
    /// 6984: reference data not usable.
    pub const REFERENCE_DATA_NOT_USABLE: StatusWord = StatusWord(0x6984);
    /// 6985: conditions of use not satisfied (for example no challenge outstanding).
    pub const CONDITIONS_NOT_SATISFIED: StatusWord = StatusWord(0x6985);
    /// 6A80: incorrect parameters in the data field.
    pub const WRONG_DATA: StatusWord = StatusWord(0x6A80);
    /// 6A81: function not supported.
    pub const FUNCTION_NOT_SUPPORTED: StatusWord = StatusWord(0x6A81);
    /// 6A82: file or application not found.
    pub const NOT_FOUND: StatusWord = StatusWord(0x6A82);
    /// 6A86: incorrect P1-P2.
    pub const WRONG_P1P2: StatusWord = StatusWord(0x6A86);
    /// 6A88: referenced data (key, PIN) not found.
    pub const REFERENCE_NOT_FOUND: StatusWord = StatusWord(0x6A88);
    /// 6D00: instruction not supported.
    pub const INS_NOT_SUPPORTED: StatusWord = StatusWord(0x6D00);
    /// 6E00: class not supported.
    pub const CLA_NOT_SUPPORTED: StatusWord = StatusWord(0x6E00);
    /// 6F00: no precise diagnosis.
    pub const UNKNOWN: StatusWord = StatusWord(0x6F00);

    /// Builds a status word from its two bytes.
    pub const fn from_bytes(sw1: u8, sw2: u8) -> Self {
        StatusWord(u16::from_be_bytes([sw1, sw2]))
    }

    /// 63Cx: a verification failed (or was only queried) and `tries` remain.
    pub const fn tries_remaining(tries: u8) -> Self {
        StatusWord(0x63C0 | (tries & 0x0F) as u16)
    }

    /// 6Cxx: wrong Le; the card has exactly `length` bytes.
    pub const fn wrong_le(length: u8) -> Self {
        StatusWord(0x6C00 | length as u16)
    }

    /// The two bytes, SW1 first.
    pub const fn to_bytes(self) -> [u8; 2] {
        self.0.to_be_bytes()
    }

    /// SW1.
    pub const fn sw1(self) -> u8 {
        self.to_bytes()[0]
    }

    /// SW2.
    pub const fn sw2(self) -> u8 {
        self.to_bytes()[1]
    }

    /// 9000.
    pub const fn is_ok(self) -> bool {
        self.0 == 0x9000
    }

    /// Tries left of a reference (PIN, PUK, admin key) from 63Cx; `Some(0)` is also reported
    /// for 6983 (blocked). `None` for any other status word.
    pub const fn tries_left(self) -> Option<u8> {
        if self.0 & 0xFFF0 == 0x63C0 {
            Some((self.0 & 0x000F) as u8)
        } else if self.blocked() {
            Some(0)
        } else {
            None
        }
    }

    /// 6983: the reference is blocked.
    pub const fn blocked(self) -> bool {
        self.0 == 0x6983
    }

    /// 61xx: more response data is waiting (GET RESPONSE with Le = `xx`, 00 meaning 256).
    pub const fn bytes_remaining(self) -> Option<usize> {
        if self.sw1() == 0x61 {
            Some(if self.sw2() == 0 {
                256
            } else {
                self.sw2() as usize
            })
        } else {
            None
        }
    }

    /// 6Cxx: the command must be repeated with Le = `xx`.
    pub const fn correct_le(self) -> Option<usize> {
        if self.sw1() == 0x6C {
            Some(if self.sw2() == 0 {
                256
            } else {
                self.sw2() as usize
            })
        } else {
            None
        }
    }
}

impl fmt::Debug for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StatusWord({:04X})", self.0)
    }
}

impl fmt::Display for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04X}", self.0)
    }
}

/// A response APDU: data (wiped on drop) and status word.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    /// Response data.
    pub data: Zeroizing<Vec<u8>>,
    /// Status word.
    pub sw: StatusWord,
}

impl Response {
    /// A response with data.
    pub fn new(data: Vec<u8>, sw: StatusWord) -> Self {
        Response {
            data: Zeroizing::new(data),
            sw,
        }
    }

    /// A response with only a status word.
    pub fn status(sw: StatusWord) -> Self {
        Response::new(Vec::new(), sw)
    }

    /// A 9000 response with data.
    pub fn ok(data: Vec<u8>) -> Self {
        Response::new(data, StatusWord::OK)
    }

    /// Parses `data || SW1 SW2`.
    pub fn parse(bytes: &[u8]) -> Result<Response, ApduError> {
        let Some((data, sw)) = bytes.split_last_chunk::<2>() else {
            return Err(ApduError::TooShort(bytes.len()));
        };
        Ok(Response::new(
            data.to_vec(),
            StatusWord::from_bytes(sw[0], sw[1]),
        ))
    }

    /// Encodes `data || SW1 SW2` (zeroizing: the data may be secret).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(self.data.len() + 2));
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&self.sw.to_bytes());
        out
    }

    /// True for 9000.
    pub fn is_ok(&self) -> bool {
        self.sw.is_ok()
    }

    /// Takes the data out (the response's own buffer is left empty).
    pub fn take_data(&mut self) -> Zeroizing<Vec<u8>> {
        let mut data = Zeroizing::new(Vec::new());
        std::mem::swap(&mut data, &mut self.data);
        data
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("len", &self.data.len())
            .field("sw", &self.sw)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(command: &Command) -> Command {
        let bytes = command.encode().expect("encodes");
        Command::parse(&bytes).expect("parses")
    }

    #[test]
    fn case_1_is_the_header_only() {
        let c = Command::new(0x00, 0xA4, 0x04, 0x00);
        assert_eq!(&c.encode().expect("encodes")[..], &[0x00, 0xA4, 0x04, 0x00]);
        assert_eq!(roundtrip(&c), c);
    }

    #[test]
    fn short_cases_encode_as_iso_7816_3_says() {
        let get_challenge = Command::new(0x00, 0x84, 0x00, 0x00).with_le(8);
        assert_eq!(
            &get_challenge.encode().expect("encodes")[..],
            &[0, 0x84, 0, 0, 8]
        );
        let le_256 = Command::new(0x00, 0xCA, 0x01, 0x00).with_le(256);
        assert_eq!(&le_256.encode().expect("encodes")[..], &[0, 0xCA, 1, 0, 0]);
        let verify = Command::new(0x00, 0x20, 0x00, 0x80).with_data(b"1234".to_vec());
        assert_eq!(
            &verify.encode().expect("encodes")[..],
            &[0, 0x20, 0, 0x80, 4, b'1', b'2', b'3', b'4']
        );
        let case_4 = Command::new(0x00, 0x87, 0x03, 0x9B)
            .with_data(vec![0x7C, 0x02, 0x80, 0x00])
            .with_le(256);
        assert_eq!(
            &case_4.encode().expect("encodes")[..],
            &[0, 0x87, 3, 0x9B, 4, 0x7C, 2, 0x80, 0, 0]
        );
        for c in [get_challenge, le_256, verify, case_4] {
            assert!(!c.is_extended());
            assert_eq!(roundtrip(&c), c);
        }
    }

    #[test]
    fn extended_cases_roundtrip() {
        let long = Command::new(0x00, 0xDB, 0x3F, 0xFF).with_data(vec![0x5A; 300]);
        let bytes = long.encode().expect("encodes");
        assert_eq!(&bytes[4..7], &[0x00, 0x01, 0x2C]);
        assert_eq!(bytes.len(), 4 + 3 + 300);
        let long_le = Command::new(0x00, 0xCB, 0x3F, 0xFF)
            .with_data(vec![0x5C, 0x03, 0x5F, 0xC1, 0x02])
            .with_le(65_536);
        let bytes = long_le.encode().expect("encodes");
        assert_eq!(&bytes[4..7], &[0x00, 0x00, 0x05]);
        assert_eq!(&bytes[bytes.len() - 2..], &[0x00, 0x00]);
        let only_le = Command::new(0x00, 0xCA, 0x00, 0x00).with_le(1000);
        assert_eq!(
            &only_le.encode().expect("encodes")[..],
            &[0, 0xCA, 0, 0, 0, 0x03, 0xE8]
        );
        for c in [long, long_le, only_le] {
            assert!(c.is_extended());
            assert_eq!(roundtrip(&c), c);
        }
    }

    #[test]
    fn malformed_commands_are_refused_without_panicking() {
        assert_eq!(Command::parse(&[0, 0x20, 0]), Err(ApduError::TooShort(3)));
        // Lc says 4, only 2 bytes follow.
        assert!(Command::parse(&[0, 0x20, 0, 0x80, 4, 1, 2]).is_err());
        // Lc says 1, 3 bytes follow (neither case 3 nor case 4).
        assert!(Command::parse(&[0, 0x20, 0, 0x80, 1, 1, 2, 3]).is_err());
        // Extended Lc of 0 is not a valid encoding.
        assert!(Command::parse(&[0, 0x20, 0, 0x80, 0, 0, 0, 1]).is_err());
        // Extended Lc longer than the body.
        assert!(Command::parse(&[0, 0x20, 0, 0x80, 0, 0x10, 0, 1]).is_err());
        assert!(Command::new(0, 0, 0, 0).with_le(70_000).encode().is_err());
        assert!(
            Command::new(0, 0, 0, 0)
                .with_data(vec![0; 70_000])
                .encode()
                .is_err()
        );
    }

    #[test]
    fn every_short_input_parses_or_errs() {
        // A cheap exhaustive pass over small bodies: no panic, no out-of-bounds.
        for len in 0..8usize {
            for fill in [0x00u8, 0x01, 0x02, 0x03, 0xFF] {
                let mut bytes = vec![0x00, 0xB0, 0x00, 0x00];
                bytes.extend(std::iter::repeat_n(fill, len));
                let _ = Command::parse(&bytes);
            }
        }
    }

    #[test]
    fn debug_never_prints_data() {
        let c = Command::new(0x00, 0x20, 0x00, 0x80).with_data(b"secret-pin".to_vec());
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!shown.contains("115"), "{shown}"); // b's' in decimal
        assert!(shown.contains("lc: 10"), "{shown}");
        let r = Response::ok(b"cryptogram".to_vec());
        let shown = format!("{r:?}");
        assert!(!shown.contains("crypt"), "{shown}");
        assert!(shown.contains("9000"), "{shown}");
    }

    #[test]
    fn responses_parse_and_encode() {
        let r = Response::parse(&[0xAA, 0xBB, 0x90, 0x00]).expect("parses");
        assert_eq!(&r.data[..], &[0xAA, 0xBB]);
        assert!(r.is_ok());
        assert_eq!(&r.encode()[..], &[0xAA, 0xBB, 0x90, 0x00]);
        assert_eq!(Response::parse(&[0x90]), Err(ApduError::TooShort(1)));
        let r = Response::parse(&[0x63, 0xC2]).expect("parses");
        assert!(r.data.is_empty());
        assert_eq!(r.sw.tries_left(), Some(2));
    }

    #[test]
    fn status_word_helpers() {
        assert!(StatusWord::OK.is_ok());
        assert_eq!(StatusWord::from_bytes(0x63, 0xC4).tries_left(), Some(4));
        assert_eq!(StatusWord::tries_remaining(3), StatusWord(0x63C3));
        assert_eq!(StatusWord::AUTH_METHOD_BLOCKED.tries_left(), Some(0));
        assert!(StatusWord::AUTH_METHOD_BLOCKED.blocked());
        assert_eq!(StatusWord::OK.tries_left(), None);
        assert_eq!(StatusWord(0x6300).tries_left(), None);
        assert_eq!(StatusWord(0x6110).bytes_remaining(), Some(16));
        assert_eq!(StatusWord(0x6100).bytes_remaining(), Some(256));
        assert_eq!(StatusWord::wrong_le(8).correct_le(), Some(8));
        assert_eq!(StatusWord(0x6A82).to_string(), "6A82");
        assert_eq!(format!("{:?}", StatusWord(0x6983)), "StatusWord(6983)");
        assert_eq!(
            (StatusWord::NOT_FOUND.sw1(), StatusWord::NOT_FOUND.sw2()),
            (0x6A, 0x82)
        );
    }
}
