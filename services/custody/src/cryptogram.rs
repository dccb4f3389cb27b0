//! ComputeCryptogram: a card's challenge in, its response out, with the caller's scope, the
//! guards, the per-card limit and replay refusal in front, and the audit record written
//! before the answer. Every refusal is on the record too.

use cms_cardcrypto::{Scheme, Zeroizing, checksum, parse_with_checksum};
use cms_proto::common::v1::AuthContext;
use cms_proto::custody::v1 as pb;

use crate::audit::{Event, Refusal, UsageClaim, Written};
use crate::convert::{algorithm_from_proto, scheme_from_proto};
use crate::custody::{Custody, context};
use crate::error::Error;
use crate::guards::{self, Peer};
use crate::keyrules;
use crate::keystore::{CryptogramInput, KeystoreError, on_keystore};

const MAX_CARD_ID: usize = 64;

impl Custody {
    /// Records the refusal of a cryptogram request; returns the error to send (or the audit's
    /// own, when the record cannot be written).
    async fn refuse(
        &self,
        caller: &str,
        auth: &AuthContext,
        req: &pb::ComputeCryptogramRequest,
        error: Error,
    ) -> Error {
        let event = Event::cryptogram_refused(
            caller,
            auth.clone(),
            &req.master_key_reference,
            req.master_key_version,
            error.to_string(),
        );
        match self.audit.record(event, None).await {
            Ok(_) => error,
            Err(e) => e.into(),
        }
    }

    /// ComputeCryptogram.
    pub(crate) async fn compute_cryptogram(
        &self,
        peer: &Peer,
        req: pb::ComputeCryptogramRequest,
    ) -> Result<pb::ComputeCryptogramResponse, Error> {
        let mut req = ChallengeWiped(req);
        let caller = self.caller(peer)?;
        let identity = caller.identity.clone();
        let mut auth = context(req.auth.take());
        auth.card_id = req.card_id.clone();
        let kek = self.kek()?;

        // Who may use which key comes before anything else is looked at.
        if let Err(e) = caller.require_key(&req.master_key_reference) {
            return Err(self.refuse(&identity, &auth, &req, e).await);
        }
        if let Err(e) = guards::require_context(&auth) {
            return Err(self.refuse(&identity, &auth, &req, e).await);
        }
        let _slot = self
            .outstanding
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded)?;
        if let Err(e) = self.limiter.take(&identity) {
            return Err(self.refuse(&identity, &auth, &req, e).await);
        }
        let (response, scheme, challenge) = match self.validate_and_compute(&req).await {
            Ok(computed) => computed,
            Err(e) => return Err(self.refuse(&identity, &auth, &req, e).await),
        };
        // A card is its identifier under its master key: the same identifier under another
        // key is another card.
        let card: [&[u8]; 2] = [req.master_key_reference.as_bytes(), &req.card_id];
        let claim = UsageClaim {
            card_fp: kek.fingerprint("card", &card),
            challenge_fp: kek.fingerprint("card-challenge", &[card[0], card[1], &challenge]),
            limit: self.guards.per_card_limit,
            window_ms: i64::try_from(self.guards.per_card_window_secs * 1000).unwrap_or(i64::MAX),
            replay_window_ms: i64::try_from(self.guards.replay_window_secs * 1000)
                .unwrap_or(i64::MAX),
        };
        let event = Event::cryptogram_answered(
            &identity,
            auth,
            &req.master_key_reference,
            req.master_key_version,
            scheme,
        );
        match self.audit.record(event, Some(claim)).await? {
            Written::Recorded { seq } => Ok(pb::ComputeCryptogramResponse {
                response_checksum: checksum(&response),
                response: response.to_vec(),
                master_key_version: req.master_key_version,
                audit_sequence: seq,
            }),
            Written::Refused {
                refusal: Refusal::Replay,
                ..
            } => Err(Error::Replay),
            Written::Refused {
                refusal: Refusal::CardLimit,
                ..
            } => Err(Error::CardLimit {
                limit: self.guards.per_card_limit,
                window_hours: self.guards.per_card_window_secs / 3600,
            }),
        }
    }

    /// Checks the request and computes the card's response; also gives back the scheme and
    /// the challenge's bytes (the replay fingerprint is taken over them).
    async fn validate_and_compute(
        &self,
        req: &pb::ComputeCryptogramRequest,
    ) -> Result<(Zeroizing<Vec<u8>>, Scheme, Zeroizing<Vec<u8>>), Error> {
        if req.card_id.is_empty() || req.card_id.len() > MAX_CARD_ID {
            return Err(Error::Invalid {
                field: "card_id",
                message: format!("a card identifier is 1 to {MAX_CARD_ID} bytes"),
            });
        }
        let scheme = scheme_from_proto(req.scheme)?;
        let admin_algorithm = algorithm_from_proto(req.admin_key_algorithm, "admin_key_algorithm")?;
        keyrules::scheme_fits(scheme, admin_algorithm)?;
        let challenge = challenge_bytes(req, admin_algorithm.block_len())?;
        if challenge.len() != admin_algorithm.block_len() {
            return Err(Error::Invalid {
                field: "challenge",
                message: format!(
                    "a {} admin key answers a {}-byte challenge; got {} bytes",
                    admin_algorithm.as_str(),
                    admin_algorithm.block_len(),
                    challenge.len()
                ),
            });
        }
        let handle = self.usable_key(&req.master_key_reference, req.master_key_version)?;
        let card_id = req.card_id.clone();
        let key_version = req.master_key_version;
        let (response, challenge) = on_keystore(&self.keystore, move |keystore| {
            let input = CryptogramInput {
                scheme,
                card_id: &card_id,
                key_version,
                admin_algorithm,
                challenge: &challenge,
            };
            Ok((keystore.cryptogram(&handle, &input)?, challenge))
        })
        .await
        .map_err(|e| match e {
            KeystoreError::Diversify(d) => Error::Invalid {
                field: "scheme",
                message: d.to_string(),
            },
            other => Error::Keystore(other),
        })?;
        Ok((response, scheme, challenge))
    }
}

/// A cryptogram request whose challenge (raw or typed) is wiped when it is dropped, whatever
/// way the request ends.
struct ChallengeWiped(pb::ComputeCryptogramRequest);

impl std::ops::Deref for ChallengeWiped {
    type Target = pb::ComputeCryptogramRequest;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ChallengeWiped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl ChallengeWiped {
    fn wipe(&mut self) {
        use zeroize::Zeroize;
        self.0.challenge.zeroize();
        if let Some(code) = &mut self.0.challenge_code {
            code.hex.zeroize();
            code.checksum.zeroize();
        }
    }
}

impl Drop for ChallengeWiped {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// The challenge as raw bytes, from `challenge` or from the typed `challenge_code`. A typed
/// code must have the length the admin key answers (`block_len` bytes), or it is a
/// wrong-length code (a raw challenge's length is checked by the caller).
fn challenge_bytes(
    req: &pb::ComputeCryptogramRequest,
    block_len: usize,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    match (&req.challenge_code, req.challenge.is_empty()) {
        (Some(code), true) => {
            parse_with_checksum(&code.hex, &code.checksum, &[block_len]).map_err(|source| {
                Error::Code {
                    field: "challenge_code",
                    source,
                }
            })
        }
        (None, false) => Ok(Zeroizing::new(req.challenge.clone())),
        (Some(_), false) => Err(Error::Invalid {
            field: "challenge",
            message: "give the challenge either as bytes or as a typed code, not both".into(),
        }),
        (None, true) => Err(Error::Invalid {
            field: "challenge",
            message: "a challenge is required".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cryptogram_request_loses_its_challenge_when_it_goes() {
        let mut req = ChallengeWiped(pb::ComputeCryptogramRequest {
            card_id: b"card".to_vec(),
            challenge: vec![0xA5; 16],
            challenge_code: Some(cms_proto::common::v1::TypedCode {
                hex: "A5A5 A5A5 A5A5 A5A5".into(),
                checksum: "1234".into(),
            }),
            ..Default::default()
        });
        req.wipe();
        assert!(req.challenge.is_empty());
        let code = req.challenge_code.as_ref().unwrap();
        assert!(code.hex.is_empty() && code.checksum.is_empty());
        // The card identifier is no secret, and stays.
        assert_eq!(req.card_id, b"card");
    }
}
