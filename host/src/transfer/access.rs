//! Who may move which file, one rule for HTTP, WebSocket and QUIC alike:
//!
//! - starting an upload needs an identified client and the policy's yes
//!   (`may-transfer upload`); a policy that does not decide transfers
//!   allows none;
//! - an upload in progress belongs to whoever started it: to anyone else it
//!   does not exist;
//! - a finished file can be fetched by its owner and by the recipients of
//!   an open offer of it (`offers`); the policy may refuse that
//!   (`may-transfer download`) but cannot open anyone else's file;
//! - offering a file needs its owner and the policy's yes (`push`).

use std::collections::BTreeMap;

use crate::hooks::{Admission, FileAction, FileSubject, MayRegister};
use crate::protocol::ErrorCode;
use crate::store::files::FileRow;

/// A client as admission named it: user and tier.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub user: &'a str,
    pub tier: &'a str,
}

/// Why a transfer was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub code: ErrorCode,
    pub reason: String,
}

impl Refused {
    fn not_found() -> Self {
        Self {
            code: ErrorCode::NotFound,
            reason: "no such file".to_owned(),
        }
    }
}

/// Whether `who` may start uploading `size` bytes named `name`.
pub fn may_upload(
    admission: &dyn Admission,
    who: Option<Who<'_>>,
    name: &str,
    size: u64,
) -> Result<(), Refused> {
    let Some(who) = who else {
        return Err(Refused {
            code: ErrorCode::Forbidden,
            reason: "only a client the policy identified may upload files".to_owned(),
        });
    };
    let subject = FileSubject {
        id: "",
        owner: who.user,
        name,
        size,
    };
    match admission.may_transfer(who.user, who.tier, FileAction::Upload, &subject) {
        MayRegister::Allow => Ok(()),
        MayRegister::Refuse { code, reason } => Err(Refused { code, reason }),
        MayRegister::Undecided => Err(Refused {
            code: ErrorCode::Forbidden,
            reason: "the policy does not allow clients to upload files".to_owned(),
        }),
    }
}

/// Whether `who` may continue (or look at, or delete) upload `file`.
pub fn owns(who: Option<Who<'_>>, file: &FileRow) -> Result<(), Refused> {
    match who {
        Some(who) if who.user == file.owner => Ok(()),
        _ => Err(Refused::not_found()),
    }
}

/// Whether `who` may fetch `file`: its owner, or (`offered`) a recipient
/// of an open offer of it, as `offers` found; then the policy may say no.
pub fn may_download(
    admission: &dyn Admission,
    who: Option<Who<'_>>,
    file: &FileRow,
    offered: bool,
) -> Result<(), Refused> {
    if !offered {
        owns(who, file)?;
    }
    // A channel offer may reach anonymous subscribers: nothing for the
    // policy to ask about them.
    let Some(who) = who else {
        return Ok(());
    };
    let metadata = metadata(file);
    let subject = FileSubject {
        id: &file.id,
        owner: &file.owner,
        name: name(&metadata),
        size: file.length,
    };
    match admission.may_transfer(who.user, who.tier, FileAction::Download, &subject) {
        MayRegister::Allow | MayRegister::Undecided => Ok(()),
        MayRegister::Refuse { code, reason } => Err(Refused { code, reason }),
    }
}

/// A file's metadata as stored (tus `Upload-Metadata`, or `name` and
/// `sha256` of an `upload` message).
pub fn metadata(file: &FileRow) -> BTreeMap<String, String> {
    serde_json::from_str(&file.metadata).unwrap_or_default()
}

/// The name a file goes by: its `filename` (tus-js-client, Uppy) or `name`.
pub fn name(metadata: &BTreeMap<String, String>) -> &str {
    metadata
        .get("filename")
        .or_else(|| metadata.get("name"))
        .map_or("", String::as_str)
}
