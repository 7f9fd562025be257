//! File transfers: where files live ([`storage`]), who may move them
//! ([`access`]), an upload received as checked chunks ([`upload`]), a file
//! sent as chunks ([`download`]) through the transport's [`sink`], and push
//! as notify-then-pull ([`offers`]). The HTTP side (tus uploads, ranged
//! downloads) is in `transport::http::files`.

pub mod access;
pub mod download;
pub mod offers;
pub mod sink;
pub mod storage;
pub mod upload;
