//! File transfers (issue 14): where uploaded and pushed files live
//! ([`storage`]). The tus upload endpoint, ranged downloads, transfers over
//! WebSocket and QUIC, and push are not built yet.

pub mod access;
pub mod download;
pub mod sink;
pub mod storage;
pub mod upload;
