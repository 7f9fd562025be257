//! What travels through a connection's outbound queue: a message plus its
//! encodings, made lazily and at most once per frame kind, so a publish fanned
//! out to many subscribers is serialized once, not once per subscriber.
//! The encodings are plain [`Bytes`]; which frame carries them is the
//! transport's business.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::protocol::{Msg, codec};

#[derive(Debug, Clone)]
pub struct Outbound(Arc<Envelope>);

#[derive(Debug)]
struct Envelope {
    msg: Msg,
    text: OnceLock<Bytes>,
    binary: OnceLock<Bytes>,
}

impl Outbound {
    pub fn new(msg: Msg) -> Self {
        Self(Arc::new(Envelope {
            msg,
            text: OnceLock::new(),
            binary: OnceLock::new(),
        }))
    }

    pub fn msg(&self) -> &Msg {
        &self.0.msg
    }

    /// The JSON encoding; always valid UTF-8 (it is made from a `String`).
    pub fn text(&self) -> Bytes {
        self.0
            .text
            .get_or_init(|| Bytes::from(codec::encode_text(&self.0.msg)))
            .clone()
    }

    pub fn binary(&self) -> Bytes {
        self.0
            .binary
            .get_or_init(|| codec::encode_binary(&self.0.msg))
            .clone()
    }
}

impl From<Msg> for Outbound {
    fn from(msg: Msg) -> Self {
        Outbound::new(msg)
    }
}
