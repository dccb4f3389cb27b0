//! The local all-in-one deployment: a data directory with the dev PKI, one config per
//! service, and the five services as supervised child processes. Used by `cms up` and by the
//! end-to-end test harness, and the `cms demo` walk-through.

pub mod bootstrap;
pub mod browser_cert;
pub mod demo;
pub mod layout;
pub mod supervise;
