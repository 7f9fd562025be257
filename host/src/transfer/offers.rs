//! Push, as notify then pull: an offer tells a user, a channel's
//! subscribers or one session that a file is there for them (`file_offer`:
//! id, name, size, digest); each recipient pulls it when it is ready, with
//! `download` or `GET /files/{id}?offer=…`, resuming as any download does.
//!
//! Offers live in the store, so a user who is offline when a file is
//! offered is told when they connect (and a session's offers go to the
//! connection that resumes it), until the offer's TTL. Channel offers go to
//! the subscribers of the moment only (channel history comes later).
//! Each offer moves `offered` → `pulling` (a download started) → `done` (a
//! download sent the last byte; it can still be pulled again until its
//! TTL, and is no longer announced), or ends `expired` at its TTL, or
//! `failed` when its file is gone; the operator API shows them.

use std::sync::Arc;

use dashmap::DashMap;

use crate::channels::Channels;
use crate::delivery::queue::{OutboundQueue, Overflow};
use crate::delivery::table::{ConnInfo, ConnState, ConnTable};
use crate::delivery::{Outbound, deliver};
use crate::ids::NodeId;
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, Msg, Target};
use crate::store::files::FileRow;
use crate::store::offers::{self as rows, OfferRow};
use crate::store::{Store, StoreError, wall_ms};

use super::access::{self, Refused, Who};
use super::storage::{FileError, Storage};

/// How long ended offers stay visible in the API.
const KEEP_ENDED_MS: i64 = 24 * 60 * 60 * 1000;

/// Why an offer could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OfferError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the file is not complete yet; offer it once its upload finishes")]
    Incomplete,
    #[error("{0}")]
    Refused(String, ErrorCode),
    #[error("{0}")]
    BadTarget(String),
    #[error("the store failed")]
    Store(#[from] StoreError),
}

impl OfferError {
    pub fn code(&self) -> ErrorCode {
        match self {
            OfferError::File(e) => e.code(),
            OfferError::Incomplete => ErrorCode::NotFound,
            OfferError::Refused(_, code) => *code,
            OfferError::BadTarget(_) => ErrorCode::BadMessage,
            OfferError::Store(_) => ErrorCode::Internal,
        }
    }
}

impl From<Refused> for OfferError {
    fn from(refused: Refused) -> Self {
        OfferError::Refused(refused.reason, refused.code)
    }
}

/// Limits on offers.
#[derive(Debug, Clone)]
pub struct OfferLimits {
    pub default_ttl_ms: u64,
    pub max_ttl_ms: u64,
}

pub struct Offers {
    store: Store,
    files: Arc<Storage>,
    table: Arc<ConnTable>,
    channels: Arc<Channels>,
    metrics: Arc<Metrics>,
    node: NodeId,
    limits: OfferLimits,
    /// `user:NAME` and `session:ID` with offers open (and when each was
    /// noted), so a `hello` asks the store only when there is something
    /// to tell: most connections have no offers waiting.
    waiting: DashMap<String, std::time::Instant>,
}

impl Offers {
    pub fn new(
        store: Store,
        files: Arc<Storage>,
        table: Arc<ConnTable>,
        channels: Arc<Channels>,
        metrics: Arc<Metrics>,
        node: NodeId,
        limits: OfferLimits,
    ) -> Self {
        Self {
            store,
            files,
            table,
            channels,
            metrics,
            node,
            limits,
            waiting: DashMap::new(),
        }
    }

    /// Reads which users and sessions have offers open (at start, and after
    /// each expiry sweep).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let open = self
            .store
            .call(move |db| rows::open_targets(db, wall_ms()))
            .await?;
        let open: std::collections::HashSet<String> = open.into_iter().collect();
        // Keys noted while the store was read stay: their offers are newer.
        self.waiting
            .retain(|key, noted| open.contains(key) || *noted >= started);
        for key in open {
            self.waiting.entry(key).or_insert(started);
        }
        Ok(())
    }

    /// Offers `file` to `to` on behalf of `from` (who must already have been
    /// found allowed); tells those online now. The offer and how many
    /// connections were told.
    pub async fn offer(
        &self,
        from: &str,
        file: &str,
        to: Target,
        ttl_ms: Option<u64>,
    ) -> Result<(OfferRow, u64), OfferError> {
        let file = self.files.info(file).await?;
        if file.sha256.is_none() {
            return Err(OfferError::Incomplete);
        }
        let ttl = ttl_ms
            .unwrap_or(self.limits.default_ttl_ms)
            .clamp(1, self.limits.max_ttl_ms);
        let (kind, target, to_user) = match &to {
            Target::User(user) if !user.is_empty() => ("user", user.clone(), user.clone()),
            Target::Channel(channel) => {
                crate::protocol::names::validate_channel_name(channel)
                    .map_err(|e| OfferError::BadTarget(format!("to.channel: {e}")))?;
                ("channel", channel.clone(), String::new())
            }
            Target::Session(session) => {
                // Only a connection of this relay, online now: its user is
                // who may pull, from it or from the connection resuming it.
                let conn = self
                    .node
                    .parse_scoped(session)
                    .and_then(|id| self.table.get(id))
                    .ok_or_else(|| {
                        OfferError::BadTarget(format!("no connection with session {session:?}"))
                    })?;
                let user = conn.identity().map(|(user, _)| user).unwrap_or_default();
                ("session", session.clone(), user)
            }
            Target::User(_) => {
                return Err(OfferError::BadTarget("to.user must name a user".to_owned()));
            }
        };
        let now = wall_ms();
        let row = OfferRow {
            id: crate::secrets::random_hex(16).map_err(FileError::Io)?,
            file: file.id.clone(),
            from: from.to_owned(),
            target_kind: kind.to_owned(),
            target,
            to_user,
            state: "offered".to_owned(),
            pulls: 0,
            created_at_ms: now,
            expires_at_ms: now + ttl as i64,
            updated_at_ms: now,
            reason: None,
        };
        // The file outlives its offer.
        self.files.keep_until(&file.id, row.expires_at_ms).await?;
        let inserted = row.clone();
        self.store
            .call(move |conn| rows::insert(conn, &inserted))
            .await?;
        if kind != "channel" {
            self.waiting
                .insert(format!("{kind}:{}", row.target), std::time::Instant::now());
        }
        let notice = Outbound::new(notice(&row, &file));
        let told = match &to {
            Target::User(user) => self.tell_user(user, &notice),
            Target::Session(session) => self.tell_session(session, &notice),
            Target::Channel(channel) => self.channels.notify(channel, &notice) as u64,
        };
        tracing::info!(offer = %row.id, file = %row.file, to = %format!("{kind}:{}", row.target), told, "file offered");
        Ok((row, told))
    }

    fn tell_user(&self, user: &str, notice: &Outbound) -> u64 {
        let mut told = 0;
        for conn in self.table.all() {
            if conn.identity().is_some_and(|(u, _)| u == user) && self.tell(&conn, notice) {
                told += 1;
            }
        }
        told
    }

    fn tell_session(&self, session: &str, notice: &Outbound) -> u64 {
        let conn = self
            .node
            .parse_scoped(session)
            .and_then(|id| self.table.get(id));
        conn.map_or(0, |conn| u64::from(self.tell(&conn, notice)))
    }

    /// Queues `notice` for a connection that speaks the protocol (after its
    /// `hello`); whether it did.
    fn tell(&self, conn: &ConnInfo, notice: &Outbound) -> bool {
        let greeted = matches!(conn.state(), ConnState::Open | ConnState::Draining);
        match conn.queue() {
            Some(queue) if greeted => deliver(
                conn,
                &queue,
                notice.clone(),
                Overflow::DropNewest,
                &self.metrics,
            ),
            _ => false,
        }
    }

    /// After `hello`: tells a connection of `user` the offers still open for
    /// that user, and for the session it resumes (if it was theirs).
    pub async fn tell_open(
        &self,
        conn: Arc<ConnInfo>,
        queue: Arc<OutboundQueue>,
        user: Option<String>,
        resumed: Option<String>,
    ) {
        let user = user.filter(|u| self.waiting.contains_key(&format!("user:{u}")));
        let resumed = resumed.filter(|s| self.waiting.contains_key(&format!("session:{s}")));
        if user.is_none() && resumed.is_none() {
            return;
        }
        let now = wall_ms();
        let (for_user, for_session) = (user.clone(), resumed.clone());
        let found = self
            .store
            .call(move |db| {
                let mut open = Vec::new();
                if let Some(user) = &for_user {
                    open.extend(rows::open_for(db, "user", user, now)?);
                }
                if let Some(session) = &for_session {
                    open.extend(rows::open_for(db, "session", session, now)?);
                }
                Ok(open)
            })
            .await;
        let open = match found {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(error = &e as &dyn std::error::Error, "open offers not read");
                return;
            }
        };
        let me = user.unwrap_or_default();
        for offer in open {
            if offer.target_kind == "session" && offer.to_user != me {
                continue;
            }
            let Ok(file) = self.files.info(&offer.file).await else {
                self.failed(&offer.id, "the file is gone").await;
                continue;
            };
            deliver(
                &conn,
                &queue,
                Outbound::new(notice(&offer, &file)),
                Overflow::DropNewest,
                &self.metrics,
            );
        }
    }

    /// The open offer `id` of `file`, if `who` is among its recipients.
    pub async fn for_recipient(
        &self,
        id: &str,
        file: &str,
        who: Option<Who<'_>>,
    ) -> Result<OfferRow, Refused> {
        let not_offered = || Refused {
            code: ErrorCode::NotFound,
            reason: "no such offer for this file".to_owned(),
        };
        let key = id.to_owned();
        let offer = self
            .store
            .call(move |db| rows::get(db, &key))
            .await
            .map_err(|_| not_offered())?
            .ok_or_else(not_offered)?;
        if offer.file != file {
            return Err(not_offered());
        }
        // A done offer can still be pulled until its TTL: the relay sent
        // every byte, which does not mean the recipient got them all.
        let ended = !matches!(offer.state.as_str(), "offered" | "pulling" | "done");
        if ended || offer.expires_at_ms <= wall_ms() {
            let state = if ended {
                offer.state.as_str()
            } else {
                "expired"
            };
            return Err(Refused {
                code: ErrorCode::NotFound,
                reason: format!("the offer is {state}"),
            });
        }
        let user = who.map(|w| w.user).unwrap_or_default();
        let recipient = match offer.target_kind.as_str() {
            // Whoever a channel's subscribers are, the offer id told them.
            "channel" => true,
            _ => offer.to_user == user,
        };
        if !recipient {
            return Err(not_offered());
        }
        Ok(offer)
    }

    /// A download with offer `id` started.
    pub async fn pulling(&self, id: &str) {
        self.advance(id, "pulling").await;
    }

    /// A download with offer `id` sent the file's last byte.
    pub async fn pulled(&self, id: &str) {
        self.advance(id, "done").await;
    }

    async fn advance(&self, id: &str, state: &'static str) {
        let key = id.to_owned();
        if let Err(e) = self
            .store
            .call(move |db| rows::advance(db, &key, state, wall_ms()))
            .await
        {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                offer = id,
                "offer state not recorded"
            );
        }
    }

    async fn failed(&self, id: &str, reason: &'static str) {
        let key = id.to_owned();
        let _ = self
            .store
            .call(move |db| rows::fail(db, &key, reason, wall_ms()))
            .await;
    }

    pub async fn get(&self, id: &str) -> Result<Option<OfferRow>, StoreError> {
        let key = id.to_owned();
        let row = self.store.call(move |db| rows::get(db, &key)).await?;
        Ok(row.map(as_of_now))
    }

    pub async fn list(
        &self,
        file: Option<String>,
        state: Option<String>,
        limit: usize,
    ) -> Result<Vec<OfferRow>, StoreError> {
        let rows = self
            .store
            .call(move |db| rows::list(db, file.as_deref(), state.as_deref(), limit))
            .await?;
        Ok(rows.into_iter().map(as_of_now).collect())
    }

    /// Expires offers past their TTL; how many.
    pub async fn expire(&self) -> Result<usize, StoreError> {
        let expired = self
            .store
            .call(move |db| rows::expire(db, wall_ms(), KEEP_ENDED_MS))
            .await?;
        self.refresh().await?;
        Ok(expired)
    }
}

/// Whether `who` may offer `file` to others: its owner, when the policy says
/// yes to `push` (a policy that does not decide transfers allows none).
pub fn may_push(
    admission: &dyn crate::hooks::Admission,
    who: Option<Who<'_>>,
    file: &FileRow,
) -> Result<(), Refused> {
    access::owns(who, file)?;
    let who = who.expect("an owner is someone");
    let metadata = access::metadata(file);
    let subject = crate::hooks::FileSubject {
        id: &file.id,
        owner: &file.owner,
        name: access::name(&metadata),
        size: file.length,
    };
    match admission.may_transfer(who.user, who.tier, crate::hooks::FileAction::Push, &subject) {
        crate::hooks::MayRegister::Allow => Ok(()),
        crate::hooks::MayRegister::Refuse { code, reason } => Err(Refused { code, reason }),
        crate::hooks::MayRegister::Undecided => Err(Refused {
            code: ErrorCode::Forbidden,
            reason: "the policy does not allow clients to push files".to_owned(),
        }),
    }
}

/// An offer as it stands now: one past its TTL is expired even before the
/// sweep records it.
fn as_of_now(mut offer: OfferRow) -> OfferRow {
    if matches!(offer.state.as_str(), "offered" | "pulling") && offer.expires_at_ms <= wall_ms() {
        offer.state = "expired".to_owned();
    }
    offer
}

fn notice(offer: &OfferRow, file: &FileRow) -> Msg {
    Msg::FileOffer {
        offer: offer.id.clone(),
        file: file.id.clone(),
        name: access::name(&access::metadata(file)).to_owned(),
        size: file.length,
        sha256: file.sha256.clone().unwrap_or_default(),
        from: offer.from.clone(),
        expires_at_ms: offer.expires_at_ms,
    }
}
