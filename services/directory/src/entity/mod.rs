//! sea-orm entities of the directory database.

pub mod credential;
pub mod operator;
pub mod operator_certificate;
pub mod security_question;
pub mod user;
