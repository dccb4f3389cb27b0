//! A card connected through PC/SC, as a [`CardBackend`]: every transaction is an
//! SCardBeginTransaction … SCardEndTransaction bracket, so no other application can slip a
//! command between ours (which would kill a card challenge).

use cms_card::apdu::{Command, Response};
use cms_card::backend::{CardBackend, CardError, CardTransaction};
use zeroize::Zeroize;

use crate::error::card_error;

/// Largest response pcsc-lite passes (extended APDU: 65536 data bytes + SW1 SW2).
const RECEIVE_BUFFER_LEN: usize = pcsc::MAX_BUFFER_SIZE_EXTENDED;

/// A card opened in a reader. An exclusive connection resets the card when it ends, so no
/// authentication state (an admin key authenticated for an unblock) outlives the session; a
/// shared one leaves the card as it is for the other applications.
pub struct PcscCard {
    card: Option<pcsc::Card>,
    reader: String,
    atr: Vec<u8>,
    disposition: pcsc::Disposition,
}

impl Drop for PcscCard {
    fn drop(&mut self) {
        if let Some(card) = self.card.take() {
            // On failure pcsc's own Drop disconnects (with a reset).
            let _ = card.disconnect(self.disposition);
        }
    }
}

impl std::fmt::Debug for PcscCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcscCard")
            .field("reader", &self.reader)
            .finish_non_exhaustive()
    }
}

impl PcscCard {
    pub(crate) fn new(
        card: pcsc::Card,
        reader: String,
        sharing: crate::Sharing,
    ) -> Result<Self, CardError> {
        let status = card.status2_owned().map_err(card_error)?;
        let atr = status.atr().to_vec();
        let disposition = match sharing {
            crate::Sharing::Exclusive => pcsc::Disposition::ResetCard,
            crate::Sharing::Shared => pcsc::Disposition::LeaveCard,
        };
        Ok(PcscCard {
            card: Some(card),
            reader,
            atr,
            disposition,
        })
    }

    fn card(&self) -> Result<&pcsc::Card, CardError> {
        self.card.as_ref().ok_or(CardError::Removed)
    }

    /// The reader the card is in.
    pub fn reader(&self) -> &str {
        &self.reader
    }

    /// The card's answer-to-reset at connection time.
    pub fn atr(&self) -> &[u8] {
        &self.atr
    }

    /// Whether the card is still the one we connected to (not removed or reset since).
    pub fn check_present(&self) -> Result<(), CardError> {
        self.card()?.status2_owned().map(|_| ()).map_err(card_error)
    }
}

impl CardBackend for PcscCard {
    fn transaction(&mut self) -> Result<Box<dyn CardTransaction + '_>, CardError> {
        let atr = &self.atr;
        let card = self.card.as_mut().ok_or(CardError::Removed)?;
        let transaction = card.transaction().map_err(card_error)?;
        Ok(Box::new(PcscTransaction {
            transaction,
            atr,
            buffer: vec![0u8; RECEIVE_BUFFER_LEN],
        }))
    }
}

/// One exclusive PC/SC transaction; ends (LeaveCard) when dropped.
struct PcscTransaction<'a> {
    transaction: pcsc::Transaction<'a>,
    atr: &'a [u8],
    buffer: Vec<u8>,
}

impl PcscTransaction<'_> {
    /// One raw exchange; the receive buffer is wiped after the response is copied out.
    fn exchange(&mut self, apdu: &[u8]) -> Result<Vec<u8>, CardError> {
        let result = self
            .transaction
            .transmit(apdu, &mut self.buffer)
            .map(<[u8]>::to_vec)
            .map_err(card_error);
        self.buffer.zeroize();
        self.buffer.resize(RECEIVE_BUFFER_LEN, 0);
        result
    }
}

impl CardTransaction for PcscTransaction<'_> {
    fn transmit(&mut self, command: &Command) -> Result<Response, CardError> {
        let apdu = command.encode()?;
        let mut raw = self.exchange(&apdu)?;
        let mut collected: Vec<u8> = Vec::new();
        // T=0 style continuation: 61xx means "more data: GET RESPONSE"; 6Cxx "wrong Le,
        // resend with Le = xx".
        loop {
            let (sw1, sw2) = match raw.as_slice() {
                [.., sw1, sw2] => (*sw1, *sw2),
                _ => {
                    return Err(CardError::Transport(
                        "the card sent a response shorter than a status word".into(),
                    ));
                }
            };
            match sw1 {
                0x61 => {
                    collected.extend_from_slice(&raw[..raw.len() - 2]);
                    raw.zeroize();
                    let get_response = [command.cla, 0xC0, 0x00, 0x00, sw2];
                    raw = self.exchange(&get_response)?;
                }
                0x6C if collected.is_empty() => {
                    let mut again = command.clone();
                    again.le = Some(if sw2 == 0 { 256 } else { usize::from(sw2) });
                    let apdu = again.encode()?;
                    let next = self.exchange(&apdu);
                    raw.zeroize();
                    raw = next?;
                    if raw.len() >= 2 && raw[raw.len() - 2] == 0x6C {
                        break;
                    }
                }
                _ => break,
            }
        }
        collected.extend_from_slice(&raw);
        raw.zeroize();
        let response = Response::parse(&collected);
        collected.zeroize();
        Ok(response?)
    }

    fn atr(&self) -> &[u8] {
        self.atr
    }
}
