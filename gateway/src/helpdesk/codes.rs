//! Helpdesk one-time codes: after verifying a caller by phone, the operator reads them a code
//! that counts as one self-service authentication method. Shown once; stored as SHA-256; it
//! expires (the template's validity) and survives only a few wrong tries.

use std::time::Duration;

use cms_proto::directory::v1 as dir;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::HelpdeskAction;
use ring::rand::{SecureRandom, SystemRandom};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, Set};
use subtle::ConstantTimeEq;
use tonic::Code;
use zeroize::Zeroizing;

use super::policy::{self, Card};
use super::{Call, Workflow};
use crate::Error;
use crate::db::{self, one_time_code};
use cms_proto::common::v1::ErrorReason;

/// Upper-case letters and digits without the look-alikes (I, O, 0, 1): 32 symbols, 5 bits each.
const ALPHABET: &[u8; 32] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
const DEFAULT_LENGTH: u32 = 10;
const LENGTHS: std::ops::RangeInclusive<u32> = 8..=32;
const DEFAULT_VALIDITY: Duration = Duration::from_secs(15 * 60);

pub async fn issue(
    wf: &Workflow,
    call: &mut Call,
    req: gw::IssueOneTimeCodeRequest,
) -> Result<gw::IssueOneTimeCodeResponse, Error> {
    let card = if req.credential_id.trim().is_empty() {
        any_card(wf, call, &req.user_id).await?
    } else {
        let card = policy::load(wf, call, &req.user_id, &req.credential_id).await?;
        if let Err(denial) = policy::check(&call.actor, &card, HelpdeskAction::IssueOneTimeCode) {
            call.decision.rule = denial.rule;
            return Err(denial.error);
        }
        card
    };
    call.decision.template_id = card.template.id.clone();
    call.decision.template_version = card.template.version;
    call.decision.rule = "unblock_policy.user_auth.one_time_code";
    let settings = card
        .unblock()
        .user_auth
        .and_then(|a| a.one_time_code)
        .unwrap_or_default();
    let length = if settings.length == 0 {
        DEFAULT_LENGTH
    } else {
        settings.length.clamp(*LENGTHS.start(), *LENGTHS.end())
    };
    let validity = settings
        .validity
        .and_then(|d| u64::try_from(d.seconds).ok())
        .filter(|s| *s > 0)
        .map_or(DEFAULT_VALIDITY, Duration::from_secs);
    let code = generate(length)?;
    let now = db::now_ms();
    let expires_at = now + i64::try_from(validity.as_millis()).unwrap_or(i64::MAX / 2);
    let id = uuid::Uuid::now_v7().to_string();
    one_time_code::ActiveModel {
        id: Set(id.clone()),
        user_id: Set(card.user.id.clone()),
        credential_id: Set(req.credential_id.trim().to_owned()),
        code_sha256: Set(digest(&code)),
        issued_by: Set(call.actor.username().to_owned()),
        created_at: Set(now),
        expires_at: Set(expires_at),
        attempts_left: Set(i32::try_from(wf.settings.one_time_code_attempts).unwrap_or(5)),
        used_at: Set(None),
    }
    .insert(&wf.db)
    .await?;
    Ok(gw::IssueOneTimeCodeResponse {
        code: code.to_string(),
        expires_at: Some(db::timestamp(expires_at)),
        code_id: id,
    })
}

/// The first of the user's active cards whose template lets this operator issue a code.
async fn any_card(wf: &Workflow, call: &mut Call, user_id: &str) -> Result<Card, Error> {
    let user = policy::user(wf, call, user_id).await?;
    let mut directory = wf.directory.clone();
    let credentials = call
        .budget
        .call(
            "directory",
            directory.list_user_credentials(call.budget.request(dir::ListUserCredentialsRequest {
                user_id: user.id.clone(),
                include_inactive: false,
                page: None,
            })),
        )
        .await?
        .credentials;
    let mut last = None;
    for credential in credentials {
        if !call.actor.covers_template(&credential.template_id) {
            continue;
        }
        let template = policy::template(
            wf,
            call,
            &credential.template_id,
            credential.template_version,
        )
        .await?;
        let card = Card {
            user: user.clone(),
            credential,
            template,
        };
        match policy::check(&call.actor, &card, HelpdeskAction::IssueOneTimeCode) {
            Ok(()) => return Ok(card),
            Err(denial) => last = Some(denial),
        }
    }
    match last {
        Some(denial) => {
            call.decision.rule = denial.rule;
            Err(denial.error)
        }
        None => Err(Error::refused(
            Code::FailedPrecondition,
            ErrorReason::CardUnknown,
            format!("user {user_id} has no active card within your scope"),
        )),
    }
}

fn generate(length: u32) -> Result<Zeroizing<String>, Error> {
    let mut random = Zeroizing::new(vec![0u8; length as usize]);
    SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| Error::Unavailable("no randomness available".into()))?;
    let mut code = Zeroizing::new(String::with_capacity(random.len()));
    for byte in random.iter() {
        // 256 is a multiple of 32: the low 5 bits are uniform.
        code.push(char::from(ALPHABET[usize::from(byte & 31)]));
    }
    Ok(code)
}

/// SHA-256 of the code as the user types it (upper case, no separators).
fn digest(code: &str) -> Vec<u8> {
    let normal: Zeroizing<String> = Zeroizing::new(
        code.chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect(),
    );
    ring::digest::digest(&ring::digest::SHA256, normal.as_bytes())
        .as_ref()
        .to_vec()
}

/// What checking a typed code found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Wrong, with the tries the newest live code has left.
    Wrong {
        attempts_left: u32,
    },
    /// No live code (none issued, expired, used or out of tries).
    NoCode,
}

/// Checks a code typed in self-service for `user_id` (and card): a match uses the code; a
/// miss costs the newest live code one try. For the self-service workflow.
pub async fn verify(
    db: &DatabaseConnection,
    user_id: &str,
    credential_id: &str,
    typed: &str,
) -> Result<Verdict, Error> {
    let now = db::now_ms();
    let live = one_time_code::Entity::find()
        .filter(one_time_code::Column::UserId.eq(user_id))
        .filter(one_time_code::Column::ExpiresAt.gt(now))
        .filter(one_time_code::Column::UsedAt.is_null())
        .filter(one_time_code::Column::AttemptsLeft.gt(0))
        .all(db)
        .await?;
    let live: Vec<_> = live
        .into_iter()
        .filter(|c| c.credential_id.is_empty() || c.credential_id == credential_id)
        .collect();
    let hash = digest(typed);
    for code in &live {
        if bool::from(code.code_sha256.ct_eq(&hash)) {
            let used = one_time_code::Entity::update_many()
                .col_expr(one_time_code::Column::UsedAt, Expr::value(now))
                .filter(one_time_code::Column::Id.eq(&code.id))
                .filter(one_time_code::Column::UsedAt.is_null())
                .exec(db)
                .await?;
            return Ok(if used.rows_affected == 1 {
                Verdict::Accepted
            } else {
                Verdict::NoCode
            });
        }
    }
    let Some(newest) = live.iter().max_by_key(|c| c.created_at) else {
        return Ok(Verdict::NoCode);
    };
    one_time_code::Entity::update_many()
        .col_expr(
            one_time_code::Column::AttemptsLeft,
            Expr::col(one_time_code::Column::AttemptsLeft).sub(1),
        )
        .filter(one_time_code::Column::Id.eq(&newest.id))
        .exec(db)
        .await?;
    Ok(Verdict::Wrong {
        attempts_left: u32::try_from(newest.attempts_left - 1).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_use_the_unambiguous_alphabet_and_hash_as_typed() {
        let code = generate(12).unwrap();
        assert_eq!(code.len(), 12);
        assert!(code.bytes().all(|b| ALPHABET.contains(&b)), "{}", *code);
        let spaced: String = code
            .chars()
            .enumerate()
            .flat_map(|(i, c)| {
                let sep = (i > 0 && i % 4 == 0).then_some('-');
                sep.into_iter()
                    .chain(std::iter::once(c.to_ascii_lowercase()))
            })
            .collect();
        assert_eq!(digest(&spaced), digest(&code));
        assert_ne!(digest(&code), digest("ABCDEFGHJKLM"));
    }
}
