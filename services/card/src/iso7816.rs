//! ISO 7816-4 instruction bytes and references used by both card profiles.

/// Interindustry class byte.
pub const CLA: u8 = 0x00;
/// Class byte with command chaining (bit 5): more of this command follows.
pub const CLA_CHAINING: u8 = 0x10;

/// Instruction bytes.
pub mod ins {
    /// SELECT.
    pub const SELECT: u8 = 0xA4;
    /// GET DATA (odd INS, BER-TLV data objects; PIV).
    pub const GET_DATA_BER: u8 = 0xCB;
    /// GET DATA (even INS, P1-P2 names the object).
    pub const GET_DATA: u8 = 0xCA;
    /// PUT DATA (odd INS; PIV).
    pub const PUT_DATA_BER: u8 = 0xDB;
    /// VERIFY.
    pub const VERIFY: u8 = 0x20;
    /// CHANGE REFERENCE DATA.
    pub const CHANGE_REFERENCE_DATA: u8 = 0x24;
    /// RESET RETRY COUNTER.
    pub const RESET_RETRY_COUNTER: u8 = 0x2C;
    /// GET CHALLENGE.
    pub const GET_CHALLENGE: u8 = 0x84;
    /// EXTERNAL AUTHENTICATE.
    pub const EXTERNAL_AUTHENTICATE: u8 = 0x82;
    /// GENERAL AUTHENTICATE (PIV).
    pub const GENERAL_AUTHENTICATE: u8 = 0x87;
    /// GET RESPONSE.
    pub const GET_RESPONSE: u8 = 0xC0;
}

/// SELECT P1: select by DF name (AID).
pub const SELECT_BY_NAME: u8 = 0x04;

/// VERIFY / CHANGE REFERENCE DATA / RESET RETRY COUNTER P2 of the user PIN (both profiles).
pub const PIN_REFERENCE: u8 = 0x80;
