//! The `minidriver` profile: an ISO 7816-4 card with a user PIN and an admin key, as a Windows
//! smart-card minidriver drives it. There is no single standard APDU set for such cards; this
//! module fixes the one the CMS speaks (and the virtual card implements):
//!
//! | what | command | answer |
//! |---|---|---|
//! | card identifier | GET DATA `00 CA 01 00`, Le 16 | the 16-byte `cardid` |
//! | admin-key tries left | EXTERNAL AUTHENTICATE `00 82 00 01` without data | `63Cx`, or `6983` when blocked |
//! | challenge | GET CHALLENGE `00 84 00 00`, Le 8 (3DES key) or 16 (AES key); Le 00 = the key's block | challenge, 9000; `6Cxx` names the right length |
//! | admin authentication | EXTERNAL AUTHENTICATE `00 82 00 01`, data = E_K(challenge) | 9000, `63Cx` (wrong), `6983` (blocked), `6985` (no challenge) |
//! | unblock | RESET RETRY COUNTER `00 2C 02 80`, data = new PIN; needs the admin authentication | 9000 |
//! | PIN | VERIFY `00 20 00 80`, data = PIN; without data: tries left | 9000, `63Cx`, `6983` |
//! | change PIN | CHANGE REFERENCE DATA `00 24 00 80`, data = old PIN ‖ new PIN | 9000, `63Cx`, `6983` |
//!
//! CHANGE REFERENCE DATA splits its data where the card's current PIN ends (ISO 7816-4 P1 = 00:
//! the card knows the length of its own reference data). A challenge is valid for the very next
//! command only; an admin authentication allows one RESET RETRY COUNTER and is lost with a reset
//! or a removal.
//! The card answers SELECT of the PIV AID with `6A82`, which is how an agent tells the profiles
//! apart.

/// GET DATA P1 P2 of the card identifier (a proprietary object, ISO 7816-4 range 0100-01FF).
pub const CARD_ID_P1P2: (u8, u8) = (0x01, 0x00);
/// Length of the card identifier (`cardid`: a GUID).
pub const CARD_ID_LEN: usize = 16;
/// EXTERNAL AUTHENTICATE P2: the admin key's reference.
pub const ADMIN_KEY_REFERENCE: u8 = 0x01;
/// RESET RETRY COUNTER P1: the data is the new reference data only (ISO 7816-4).
pub const RESET_WITH_NEW_PIN: u8 = 0x02;
/// Shortest PIN the card stores.
pub const MIN_PIN_LEN: usize = 4;
/// Longest PIN the card stores.
pub const MAX_PIN_LEN: usize = 16;
