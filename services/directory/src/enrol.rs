//! Self-service enrolment: security questions (answers folded, then argon2id-hashed) and
//! TOTP (secret sealed at rest, returned once as a provisioning URI). Verification counts
//! failures and locks the user's self-service after `self_service.max_failed_attempts`.

use std::collections::BTreeSet;

use cms_proto::common::v1::TotpAlgorithm;
use cms_proto::directory::v1::{
    EnrolSecurityQuestionsRequest, EnrolSecurityQuestionsResponse, EnrolTotpRequest,
    EnrolTotpResponse, GetSecurityQuestionsRequest, GetSecurityQuestionsResponse, SecurityQuestion,
    TotpState, UserStatus, VerifySecurityAnswersRequest, VerifySecurityAnswersResponse,
    VerifyTotpRequest, VerifyTotpResponse,
};
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, TransactionTrait};
use zeroize::Zeroizing;

use crate::entity::{security_question, user};
use crate::normalize;
use crate::secrets::{AnswerHasher, TotpAlg, TotpParams, base32, percent};
use crate::users::{is_locked, to_proto as user_to_proto};
use crate::util::{self, check_text, now_micros, timestamp};
use crate::{Directory, Error};

const MAX_QUESTIONS: usize = 20;
const MAX_QUESTION_CHARS: usize = 500;
const MAX_ANSWER_CHARS: usize = 256;

/// Outcome of one verification attempt, for the counters.
struct Attempt {
    attempts_remaining: u32,
    locked_until: Option<i64>,
}

impl Directory {
    /// A user who may use self-service (exists, not disabled).
    async fn self_service_user(&self, id: &str) -> Result<user::Model, Error> {
        let m = Self::user_by_id(&self.db, id).await.map_err(|e| match e {
            Error::Invalid { .. } => Error::invalid("user_id", "user_id is not a UUID"),
            other => other,
        })?;
        if m.status == UserStatus::Disabled as i32 {
            return Err(Error::FailedPrecondition(format!(
                "user {id} is disabled: self-service is refused"
            )));
        }
        Ok(m)
    }

    /// Records a failed or successful verification; locks after too many failures.
    async fn count_attempt(&self, m: &user::Model, success: bool) -> Result<Attempt, Error> {
        let max = self.self_service.max_failed_attempts.max(1);
        let now = now_micros();
        let (failed, locked_until) = if success {
            (0, None)
        } else {
            let failed = u32::try_from(m.failed_attempts).unwrap_or(0) + 1;
            if failed >= max {
                let lockout = i64::try_from(self.self_service.lockout_seconds)
                    .unwrap_or(i64::MAX / 2_000_000)
                    * 1_000_000;
                (0, Some(now + lockout))
            } else {
                (failed, None)
            }
        };
        user::Entity::update_many()
            .set(user::ActiveModel {
                failed_attempts: Set(i32::try_from(failed).unwrap_or(i32::MAX)),
                locked_until: Set(locked_until),
                ..Default::default()
            })
            .filter(user::Column::Num.eq(m.num))
            .exec(&self.db)
            .await?;
        if let Some(until) = locked_until {
            tracing::warn!(user = %m.id, "self-service locked after failed verifications");
            return Ok(Attempt {
                attempts_remaining: 0,
                locked_until: Some(until),
            });
        }
        Ok(Attempt {
            attempts_remaining: max - failed,
            locked_until: None,
        })
    }

    pub async fn enrol_security_questions(
        &self,
        req: &EnrolSecurityQuestionsRequest,
    ) -> Result<EnrolSecurityQuestionsResponse, Error> {
        let m = self.self_service_user(&req.user_id).await?;
        let needed = (req.min_enrolled as usize).max(1);
        if req.questions.len() < needed {
            return Err(Error::invalid(
                "questions",
                format!(
                    "{} questions given; at least {needed} are required",
                    req.questions.len()
                ),
            ));
        }
        if req.questions.len() > MAX_QUESTIONS {
            return Err(Error::invalid(
                "questions",
                format!("at most {MAX_QUESTIONS} questions may be enrolled"),
            ));
        }
        let min_answer = (req.min_answer_length as usize).max(1);
        let mut seen = BTreeSet::new();
        let mut folded = Vec::new();
        for (i, q) in req.questions.iter().enumerate() {
            check_text(
                &format!("questions[{i}].question"),
                &q.question,
                MAX_QUESTION_CHARS,
                true,
            )?;
            if !seen.insert(normalize::fold(&q.question)) {
                return Err(Error::invalid(
                    &format!("questions[{i}].question"),
                    format!("questions[{i}] repeats an earlier question"),
                ));
            }
            if q.answer.chars().count() > MAX_ANSWER_CHARS {
                return Err(Error::invalid(
                    &format!("questions[{i}].answer"),
                    format!(
                        "the answer to questions[{i}] is longer than {MAX_ANSWER_CHARS} characters"
                    ),
                ));
            }
            let answer = Zeroizing::new(normalize::fold_answer(&q.answer));
            if answer.chars().count() < min_answer {
                return Err(Error::invalid(
                    &format!("questions[{i}].answer"),
                    format!(
                        "the answer to questions[{i}] is too short: at least {min_answer} letters or digits"
                    ),
                ));
            }
            folded.push((q.question.clone(), answer));
        }
        // argon2id is deliberately slow: hash off the async threads.
        let key = self.key.clone();
        let hasher = self.hasher.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            folded
                .into_iter()
                .map(|(question, answer)| Ok((question, hasher.hash(&key, &answer)?)))
                .collect::<Result<Vec<_>, Error>>()
        })
        .await
        .map_err(|e| Error::Internal(format!("hashing task: {e}")))??;
        let now = now_micros();
        let txn = self.db.begin().await?;
        security_question::Entity::delete_many()
            .filter(security_question::Column::UserId.eq(m.id.clone()))
            .exec(&txn)
            .await?;
        let rows: Vec<security_question::ActiveModel> = hashed
            .into_iter()
            .enumerate()
            .map(|(i, (question, hash))| security_question::ActiveModel {
                id: Set(util::new_id()),
                user_id: Set(m.id.clone()),
                position: Set(i32::try_from(i).unwrap_or(0)),
                question: Set(question),
                answer_hash: Set(hash),
                created_at: Set(now),
            })
            .collect();
        let count = rows.len();
        security_question::Entity::insert_many(rows)
            .exec(&txn)
            .await?;
        user::Entity::update_many()
            .set(user::ActiveModel {
                questions_enrolled: Set(i32::try_from(count).unwrap_or(0)),
                questions_updated_at: Set(Some(now)),
                updated_at: Set(now),
                revision: Set(m.revision + 1),
                ..Default::default()
            })
            .filter(user::Column::Num.eq(m.num))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        tracing::info!(user = %m.id, count, "security questions enrolled");
        let questions = self.questions_of(&m.id).await?;
        let m = Self::user_by_id(&self.db, &m.id).await?;
        Ok(EnrolSecurityQuestionsResponse {
            questions: questions
                .iter()
                .map(|q| SecurityQuestion {
                    id: q.id.clone(),
                    question: q.question.clone(),
                })
                .collect(),
            enrolment: user_to_proto(&m).enrolment,
        })
    }

    async fn questions_of(&self, user_id: &str) -> Result<Vec<security_question::Model>, Error> {
        Ok(security_question::Entity::find()
            .filter(security_question::Column::UserId.eq(user_id))
            .order_by_asc(security_question::Column::Position)
            .all(&self.db)
            .await?)
    }

    pub async fn get_security_questions(
        &self,
        req: &GetSecurityQuestionsRequest,
    ) -> Result<GetSecurityQuestionsResponse, Error> {
        let m = self.self_service_user(&req.user_id).await?;
        let mut all = self.questions_of(&m.id).await?;
        let count = req.count as usize;
        if count == 0 {
            return Err(Error::invalid("count", "count must be at least 1"));
        }
        if count > all.len() {
            return Err(Error::FailedPrecondition(format!(
                "user {} has {} security questions enrolled; {count} were requested",
                m.id,
                all.len()
            )));
        }
        // Fisher-Yates with the system RNG.
        for i in (1..all.len()).rev() {
            let mut b = [0u8; 4];
            self.key.random(&mut b)?;
            let j = (u32::from_le_bytes(b) as usize) % (i + 1);
            all.swap(i, j);
        }
        all.truncate(count);
        Ok(GetSecurityQuestionsResponse {
            questions: all
                .into_iter()
                .map(|q| SecurityQuestion {
                    id: q.id,
                    question: q.question,
                })
                .collect(),
        })
    }

    pub async fn verify_security_answers(
        &self,
        req: &VerifySecurityAnswersRequest,
    ) -> Result<VerifySecurityAnswersResponse, Error> {
        let m = self.self_service_user(&req.user_id).await?;
        if is_locked(&m, now_micros()) {
            return Ok(VerifySecurityAnswersResponse {
                verified: false,
                attempts_remaining: 0,
                locked_until: m.locked_until.map(timestamp),
            });
        }
        if req.required_correct == 0 {
            return Err(Error::invalid(
                "required_correct",
                "required_correct must be at least 1",
            ));
        }
        if req.answers.len() < req.required_correct as usize || req.answers.len() > MAX_QUESTIONS {
            return Err(Error::invalid(
                "answers",
                format!(
                    "{} answers given; at least required_correct ({}) and at most {MAX_QUESTIONS} are needed",
                    req.answers.len(),
                    req.required_correct
                ),
            ));
        }
        let enrolled = self.questions_of(&m.id).await?;
        let mut seen = BTreeSet::new();
        let mut pairs = Vec::new();
        for (i, a) in req.answers.iter().enumerate() {
            let Some(q) = enrolled.iter().find(|q| q.id == a.question_id) else {
                return Err(Error::invalid(
                    &format!("answers[{i}].question_id"),
                    format!("answers[{i}] names a question the user has not enrolled"),
                ));
            };
            if !seen.insert(a.question_id.clone()) {
                return Err(Error::invalid(
                    &format!("answers[{i}].question_id"),
                    format!("answers[{i}] answers the same question twice"),
                ));
            }
            if a.answer.chars().count() > MAX_ANSWER_CHARS {
                return Err(Error::invalid(
                    &format!("answers[{i}].answer"),
                    format!("answers[{i}] is longer than {MAX_ANSWER_CHARS} characters"),
                ));
            }
            pairs.push((
                q.answer_hash.clone(),
                Zeroizing::new(normalize::fold_answer(&a.answer)),
            ));
        }
        let correct = tokio::task::spawn_blocking(move || {
            pairs
                .iter()
                .filter(|(hash, answer)| AnswerHasher::verify(hash, answer))
                .count()
        })
        .await
        .map_err(|e| Error::Internal(format!("hashing task: {e}")))?;
        let verified = correct >= req.required_correct as usize;
        let attempt = self.count_attempt(&m, verified).await?;
        tracing::info!(user = %m.id, verified, "security answers checked");
        Ok(VerifySecurityAnswersResponse {
            verified,
            attempts_remaining: attempt.attempts_remaining,
            locked_until: attempt.locked_until.map(timestamp),
        })
    }

    pub async fn enrol_totp(&self, req: &EnrolTotpRequest) -> Result<EnrolTotpResponse, Error> {
        let m = self.self_service_user(&req.user_id).await?;
        check_text("issuer", &req.issuer, 64, true)?;
        check_text("account_name", &req.account_name, 128, true)?;
        if req.issuer.contains(':') || req.account_name.contains(':') {
            return Err(Error::invalid(
                "issuer",
                "issuer and account_name may not contain ':' (it separates them in authenticator apps)",
            ));
        }
        let p = req.parameters.unwrap_or_default();
        let alg = match TotpAlgorithm::try_from(p.algorithm) {
            Ok(TotpAlgorithm::Unspecified | TotpAlgorithm::Sha1) => TotpAlg::Sha1,
            Ok(TotpAlgorithm::Sha256) => TotpAlg::Sha256,
            Ok(TotpAlgorithm::Sha512) => TotpAlg::Sha512,
            Err(_) => return Err(Error::invalid("parameters.algorithm", "unknown algorithm")),
        };
        let digits = if p.digits == 0 { 6 } else { p.digits };
        if digits != 6 && digits != 8 {
            return Err(Error::invalid("parameters.digits", "digits must be 6 or 8"));
        }
        let period = if p.period_seconds == 0 {
            30
        } else {
            p.period_seconds
        };
        if !(15..=300).contains(&period) {
            return Err(Error::invalid(
                "parameters.period_seconds",
                "period_seconds must be 15 to 300",
            ));
        }
        let params = TotpParams {
            alg,
            digits,
            period: u64::from(period),
        };
        let mut secret = Zeroizing::new(vec![0u8; params.secret_len()]);
        self.key.random(&mut secret)?;
        let sealed = self.key.seal(&format!("totp/{}", m.id), &secret)?;
        let now = now_micros();
        let until =
            now + i64::try_from(self.self_service.totp_confirm_seconds).unwrap_or(600) * 1_000_000;
        user::Entity::update_many()
            .set(user::ActiveModel {
                totp_pending_secret: Set(Some(sealed)),
                totp_pending_params: Set(params.encode()),
                totp_pending_until: Set(Some(until)),
                updated_at: Set(now),
                ..Default::default()
            })
            .filter(user::Column::Num.eq(m.num))
            .exec(&self.db)
            .await?;
        let uri = format!(
            "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm={}&digits={}&period={}",
            percent(&req.issuer),
            percent(&req.account_name),
            base32(&secret),
            percent(&req.issuer),
            params.alg_name(),
            digits,
            period
        );
        tracing::info!(user = %m.id, "TOTP enrolment started");
        Ok(EnrolTotpResponse {
            provisioning_uri: uri,
            state: TotpState::Pending as i32,
            confirm_before: Some(timestamp(until)),
        })
    }

    pub async fn verify_totp(&self, req: &VerifyTotpRequest) -> Result<VerifyTotpResponse, Error> {
        let m = self.self_service_user(&req.user_id).await?;
        let now = now_micros();
        let state = |m: &user::Model| {
            user_to_proto(m)
                .enrolment
                .map(|e| e.totp_state)
                .unwrap_or(TotpState::None as i32)
        };
        if is_locked(&m, now) {
            return Ok(VerifyTotpResponse {
                verified: false,
                state: state(&m),
                attempts_remaining: 0,
                locked_until: m.locked_until.map(timestamp),
            });
        }
        if !(req.code.len() == 6 || req.code.len() == 8)
            || !req.code.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(Error::invalid("code", "a TOTP code is 6 or 8 digits"));
        }
        let (sealed, params) = if req.confirm_enrolment {
            match (&m.totp_pending_secret, m.totp_pending_until) {
                (Some(s), Some(until)) if until > now => (s.clone(), m.totp_pending_params.clone()),
                _ => {
                    return Err(Error::FailedPrecondition(format!(
                        "user {} has no pending TOTP enrolment (or it expired): enrol again",
                        m.id
                    )));
                }
            }
        } else {
            match &m.totp_secret {
                Some(s) if m.totp_state == TotpState::Active as i32 => {
                    (s.clone(), m.totp_params.clone())
                }
                _ => {
                    return Err(Error::FailedPrecondition(format!(
                        "user {} has no confirmed TOTP enrolment",
                        m.id
                    )));
                }
            }
        };
        let params = TotpParams::decode(&params)
            .ok_or_else(|| Error::Internal("stored TOTP parameters do not parse".into()))?;
        let secret = self.key.open(&format!("totp/{}", m.id), &sealed)?;
        let now_secs = u64::try_from(now / 1_000_000).unwrap_or(0);
        let skew = u64::from(req.allowed_skew_steps.min(2));
        let step = params.verify(&secret, &req.code, now_secs, skew);
        let last = u64::try_from(m.totp_last_step).unwrap_or(0);
        // A code already used (or an older one) is refused: no replay.
        let accepted = step.filter(|s| req.confirm_enrolment || *s > last);
        let attempt = self.count_attempt(&m, accepted.is_some()).await?;
        if let Some(step) = accepted {
            let mut am = user::ActiveModel {
                totp_last_step: Set(i64::try_from(step).unwrap_or(i64::MAX)),
                ..Default::default()
            };
            if req.confirm_enrolment {
                am.totp_secret = Set(Some(sealed));
                am.totp_params = Set(params.encode());
                am.totp_state = Set(TotpState::Active as i32);
                am.totp_confirmed_at = Set(Some(now));
                am.totp_pending_secret = Set(None);
                am.totp_pending_params = Set(String::new());
                am.totp_pending_until = Set(None);
                am.updated_at = Set(now);
                am.revision = Set(m.revision + 1);
            }
            user::Entity::update_many()
                .set(am)
                .filter(user::Column::Num.eq(m.num))
                .exec(&self.db)
                .await?;
        }
        tracing::info!(user = %m.id, verified = accepted.is_some(), confirm = req.confirm_enrolment, "TOTP code checked");
        let m = Self::user_by_id(&self.db, &m.id).await?;
        Ok(VerifyTotpResponse {
            verified: accepted.is_some(),
            state: state(&m),
            attempts_remaining: attempt.attempts_remaining,
            locked_until: attempt.locked_until.map(timestamp),
        })
    }
}
