//! Custody's database: schema, migrations, and the queries the service needs.

pub mod entities;
pub mod migration;
