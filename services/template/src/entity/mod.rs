//! sea-orm entities of the template database.

pub mod template;
pub mod template_version;
