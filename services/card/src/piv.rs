//! PIV (NIST SP 800-73-4) with the YubiKey extensions: AID, references, data-object tags and the
//! small BER-TLV encodings both the agent and the virtual card need.

/// The PIV application identifier (full, with the version PIX); SELECT may use the first 5 bytes.
pub const AID: [u8; 11] = [
    0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00,
];
/// The registered application provider identifier part of the AID (what clients select).
pub const AID_RID_PIX: [u8; 5] = [0xA0, 0x00, 0x00, 0x03, 0x08];

/// Key and PIN references (P2 of VERIFY, CHANGE REFERENCE DATA, GENERAL AUTHENTICATE).
pub mod key_ref {
    /// The PIV card application PIN.
    pub const PIN: u8 = 0x80;
    /// The PIN unblocking key.
    pub const PUK: u8 = 0x81;
    /// The card management (administration) key, 9B.
    pub const MANAGEMENT: u8 = 0x9B;
}

/// Algorithm identifiers (P1 of GENERAL AUTHENTICATE, SP 800-78-4).
pub mod algorithm {
    /// 3-key 3DES.
    pub const TDES: u8 = 0x03;
    /// AES-128.
    pub const AES128: u8 = 0x08;
    /// AES-192.
    pub const AES192: u8 = 0x0A;
    /// AES-256.
    pub const AES256: u8 = 0x0C;
}

/// YubiKey extension instructions (yubico-piv-tool uses them).
pub mod yubikey {
    /// GET VERSION: 3 bytes major.minor.patch.
    pub const INS_GET_VERSION: u8 = 0xFD;
    /// GET SERIAL: 4 bytes, big-endian.
    pub const INS_GET_SERIAL: u8 = 0xF8;
    /// GET METADATA (firmware 5.3+): P2 = key or PIN reference.
    pub const INS_GET_METADATA: u8 = 0xF7;
    /// SET MANAGEMENT KEY: P1 P2 = FF FF (FF FE: touch required); data = alg, 9B, len, key.
    pub const INS_SET_MGMKEY: u8 = 0xFF;
    /// Metadata tag: algorithm (1 byte; FF for PIN and PUK).
    pub const METADATA_ALGORITHM: u8 = 0x01;
    /// Metadata tag: PIN policy and touch policy (2 bytes).
    pub const METADATA_POLICY: u8 = 0x02;
    /// Metadata tag: whether the value is still the factory default (1 byte, 0 or 1).
    pub const METADATA_IS_DEFAULT: u8 = 0x05;
    /// Metadata tag: total and remaining retries (2 bytes).
    pub const METADATA_RETRIES: u8 = 0x06;
}

/// Data-object tags: the 3-byte tag inside the GET DATA `5C` list and the BER-TLV tags inside
/// the objects.
pub mod object {
    /// Tag list of a GET DATA command.
    pub const TAG_LIST: u8 = 0x5C;
    /// Wrapper of a returned data object.
    pub const DATA: u8 = 0x53;
    /// Card Holder Unique Identifier.
    pub const CHUID: &[u8] = &[0x5F, 0xC1, 0x02];
    /// Card Capability Container.
    pub const CCC: &[u8] = &[0x5F, 0xC1, 0x07];
    /// Discovery object (one-byte tag).
    pub const DISCOVERY: &[u8] = &[0x7E];
    /// CHUID: FASC-N.
    pub const CHUID_FASCN: u8 = 0x30;
    /// CHUID: card UUID (GUID), 16 bytes: the card identifier of a PIV card.
    pub const CHUID_GUID: u8 = 0x34;
    /// CHUID: expiration date, YYYYMMDD.
    pub const CHUID_EXPIRY: u8 = 0x35;
    /// CHUID: issuer asymmetric signature.
    pub const CHUID_SIGNATURE: u8 = 0x3E;
    /// Error detection code (LRC), empty.
    pub const LRC: u8 = 0xFE;
}

/// GENERAL AUTHENTICATE dynamic authentication template and its members.
pub mod auth {
    /// Dynamic authentication template.
    pub const TEMPLATE: u8 = 0x7C;
    /// Witness.
    pub const WITNESS: u8 = 0x80;
    /// Challenge.
    pub const CHALLENGE: u8 = 0x81;
    /// Response.
    pub const RESPONSE: u8 = 0x82;
}

/// Why a TLV could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlvError {
    /// The input ends inside a tag, length or value.
    #[error("truncated TLV")]
    Truncated,
    /// A length form this code does not accept (indefinite, or more than 3 bytes).
    #[error("unsupported TLV length encoding")]
    BadLength,
}

/// Appends a BER length (definite form, up to 65535).
pub fn push_length(out: &mut Vec<u8>, len: usize) {
    match len {
        0..=0x7F => out.push(len as u8),
        0x80..=0xFF => out.extend_from_slice(&[0x81, len as u8]),
        _ => {
            let [hi, lo] = (len.min(0xFFFF) as u16).to_be_bytes();
            out.extend_from_slice(&[0x82, hi, lo]);
        }
    }
}

/// Appends `tag || length || value`.
pub fn push_tlv(out: &mut Vec<u8>, tag: &[u8], value: &[u8]) {
    out.extend_from_slice(tag);
    push_length(out, value.len());
    out.extend_from_slice(value);
}

/// Encodes one TLV.
pub fn tlv(tag: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + 3 + value.len());
    push_tlv(&mut out, tag, value);
    out
}

/// Reads a BER tag (multi-byte when the low 5 bits of the first byte are all set).
fn read_tag(input: &[u8]) -> Result<(&[u8], &[u8]), TlvError> {
    let first = *input.first().ok_or(TlvError::Truncated)?;
    let mut end = 1;
    if first & 0x1F == 0x1F {
        loop {
            let byte = *input.get(end).ok_or(TlvError::Truncated)?;
            end += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    Ok(input.split_at(end))
}

fn read_length(input: &[u8]) -> Result<(usize, &[u8]), TlvError> {
    let first = *input.first().ok_or(TlvError::Truncated)?;
    match first {
        0..=0x7F => Ok((usize::from(first), &input[1..])),
        0x81 => {
            let len = *input.get(1).ok_or(TlvError::Truncated)?;
            Ok((usize::from(len), &input[2..]))
        }
        0x82 => {
            let bytes = input.get(1..3).ok_or(TlvError::Truncated)?;
            Ok((
                usize::from(u16::from_be_bytes([bytes[0], bytes[1]])),
                &input[3..],
            ))
        }
        _ => Err(TlvError::BadLength),
    }
}

/// One tag-length-value, borrowed from its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// The tag bytes.
    pub tag: &'a [u8],
    /// The value bytes.
    pub value: &'a [u8],
}

/// Splits the first TLV off `input`: the TLV and the rest.
pub fn read_tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), TlvError> {
    let (tag, rest) = read_tag(input)?;
    let (len, rest) = read_length(rest)?;
    if rest.len() < len {
        return Err(TlvError::Truncated);
    }
    let (value, rest) = rest.split_at(len);
    Ok((Tlv { tag, value }, rest))
}

/// Iterates over consecutive TLVs, stopping at the first malformed one (reported as an error).
pub fn tlvs(mut input: &[u8]) -> impl Iterator<Item = Result<Tlv<'_>, TlvError>> {
    std::iter::from_fn(move || {
        if input.is_empty() {
            return None;
        }
        match read_tlv(input) {
            Ok((item, rest)) => {
                input = rest;
                Some(Ok(item))
            }
            Err(e) => {
                input = &[];
                Some(Err(e))
            }
        }
    })
}

/// The value of the first TLV with `tag` among consecutive TLVs.
pub fn find<'a>(input: &'a [u8], tag: &[u8]) -> Result<Option<&'a [u8]>, TlvError> {
    for item in tlvs(input) {
        let item = item?;
        if item.tag == tag {
            return Ok(Some(item.value));
        }
    }
    Ok(None)
}

/// Pads a PIN or PUK to the 8 bytes PIV expects, with 0xFF. `None` when it is longer than 8.
pub fn pad_pin(pin: &[u8]) -> Option<zeroize::Zeroizing<[u8; 8]>> {
    if pin.len() > 8 {
        return None;
    }
    let mut out = zeroize::Zeroizing::new([0xFF; 8]);
    out[..pin.len()].copy_from_slice(pin);
    Some(out)
}

/// Strips the 0xFF padding of a PIV PIN or PUK field.
pub fn unpad_pin(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0xFF).unwrap_or(field.len());
    &field[..end]
}

/// The CHUID's GUID (the card identifier of a PIV card) from a GET DATA answer (`53 ...`).
pub fn chuid_guid(get_data_answer: &[u8]) -> Result<Option<&[u8]>, TlvError> {
    let Some(chuid) = find(get_data_answer, &[object::DATA])? else {
        return Ok(None);
    };
    find(chuid, &[object::CHUID_GUID])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_roundtrip_with_every_length_form() {
        for len in [0usize, 1, 0x7F, 0x80, 0xFF, 0x100, 0x1234] {
            let value = vec![0xA5; len];
            let encoded = tlv(&[0x5F, 0xC1, 0x02], &value);
            let (item, rest) = read_tlv(&encoded).expect("reads");
            assert_eq!(item.tag, &[0x5F, 0xC1, 0x02]);
            assert_eq!(item.value, &value[..]);
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn malformed_tlvs_are_errors() {
        assert_eq!(read_tlv(&[]), Err(TlvError::Truncated));
        assert_eq!(read_tlv(&[0x5F]), Err(TlvError::Truncated));
        assert_eq!(read_tlv(&[0x80, 0x05, 1, 2]), Err(TlvError::Truncated));
        assert_eq!(read_tlv(&[0x80, 0x80]), Err(TlvError::BadLength));
        assert_eq!(read_tlv(&[0x80, 0x82, 0x01]), Err(TlvError::Truncated));
        let mut items = tlvs(&[0x80, 0x00, 0x81, 0x09]);
        assert!(matches!(items.next(), Some(Ok(_))));
        assert!(matches!(items.next(), Some(Err(TlvError::Truncated))));
        assert!(items.next().is_none());
    }

    #[test]
    fn finds_the_guid_in_a_chuid_answer() {
        let guid = [0x11u8; 16];
        let mut chuid = Vec::new();
        push_tlv(&mut chuid, &[object::CHUID_FASCN], &[0xD4; 25]);
        push_tlv(&mut chuid, &[object::CHUID_GUID], &guid);
        push_tlv(&mut chuid, &[object::LRC], &[]);
        let answer = tlv(&[object::DATA], &chuid);
        assert_eq!(chuid_guid(&answer).expect("parses"), Some(&guid[..]));
        assert_eq!(chuid_guid(&[]).expect("parses"), None);
    }

    #[test]
    fn pins_are_padded_with_ff() {
        assert_eq!(&pad_pin(b"123456").expect("fits")[..], b"123456\xFF\xFF");
        assert!(pad_pin(b"123456789").is_none());
        assert_eq!(unpad_pin(b"1234\xFF\xFF\xFF\xFF"), b"1234");
        assert_eq!(unpad_pin(b"12345678"), b"12345678");
    }
}
