//! The operator credential: the bearer token that guards `/admin` and
//! `/metrics` (the endpoints themselves are `transport::http::admin`).

pub mod credential;

pub use credential::AdminCredential;
