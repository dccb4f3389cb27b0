//! One mapping from pcsc-lite's return codes to the shared [`CardError`], so every caller
//! sees the same three situations a person can act on: pcscd is not running, the reader went
//! away, the card was removed.

use cms_card::backend::CardError;

/// Maps a PC/SC error to the card error the agent reports.
pub fn card_error(err: pcsc::Error) -> CardError {
    use pcsc::Error as E;
    match err {
        // The resource manager is not running, or stopped under us.
        E::NoService | E::ServiceStopped | E::Shutdown | E::UnknownResMng | E::CommError => {
            CardError::ServiceUnavailable
        }
        E::UnknownReader | E::ReaderUnavailable | E::NoReadersAvailable => CardError::ReaderGone,
        E::NoSmartcard => CardError::NoCard,
        // A reset by another application voids the card session just like a removal.
        E::RemovedCard | E::ResetCard | E::UnpoweredCard | E::UnresponsiveCard => {
            CardError::Removed
        }
        other => CardError::Transport(other.to_string()),
    }
}

/// Whether the error means another application holds the card exclusively.
pub fn is_sharing_violation(err: pcsc::Error) -> bool {
    matches!(err, pcsc::Error::SharingViolation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_situations_a_person_can_act_on() {
        assert_eq!(
            card_error(pcsc::Error::NoService),
            CardError::ServiceUnavailable
        );
        assert_eq!(
            card_error(pcsc::Error::ServiceStopped),
            CardError::ServiceUnavailable
        );
        assert_eq!(
            card_error(pcsc::Error::UnknownReader),
            CardError::ReaderGone
        );
        assert_eq!(
            card_error(pcsc::Error::ReaderUnavailable),
            CardError::ReaderGone
        );
        assert_eq!(card_error(pcsc::Error::RemovedCard), CardError::Removed);
        assert_eq!(card_error(pcsc::Error::ResetCard), CardError::Removed);
        assert_eq!(card_error(pcsc::Error::NoSmartcard), CardError::NoCard);
        assert!(matches!(
            card_error(pcsc::Error::InvalidValue),
            CardError::Transport(_)
        ));
        // One line each, for the person at the PC.
        for e in [
            CardError::ServiceUnavailable,
            CardError::ReaderGone,
            CardError::Removed,
        ] {
            assert!(!e.to_string().contains('\n'));
        }
    }
}
