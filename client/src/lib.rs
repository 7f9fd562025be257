//! A small client for wasmrelay, over WebSocket (`ws://`, `wss://`) or QUIC
//! (`quic://`): connect and say `hello`, subscribe and publish, send requests
//! to a space, or register under a space and serve it ([`serve`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), wasmrelay_client::Error> {
//! use wasmrelay_client::{Client, Options};
//! let mut client = Client::connect("ws://127.0.0.1:8080/ws", Options::named("demo")).await?;
//! client.subscribe("chat/lobby").await?;
//! let seq = client.publish("chat/lobby", "hello").await?;
//! # let _ = seq; Ok(()) }
//! ```
//!
//! The helpers wait for their answer; whatever else arrives meanwhile (a
//! channel message, a presence count) is kept and handed out by
//! [`Client::recv`] in arrival order.
//!
//! The client remembers where it is in every channel with history (its
//! epoch and the last seq received); after a dropped connection,
//! [`Client::reconnect`] connects again, resumes the session and
//! resubscribes each channel asking to recover what it missed, which then
//! arrives through [`Client::recv`] before any live message. For full control, [`Client::send`] and
//! [`Client::recv`] speak [`Msg`]s directly, and [`Client::split`] gives a
//! sending and a receiving half for separate tasks. PROTOCOL.md is the
//! reference for writing a client in another language.

mod error;
pub mod quic;
pub mod serve;
mod trust;
mod ws;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use wasmrelay_protocol::quic::{BULK_THRESHOLD, FrameError, frame, is_bulk, write_frame};
use wasmrelay_protocol::{Data, ErrorCode, Position, Request, Response, VERSION, batch, codec};

pub use error::Error;
pub use trust::Trust;
pub use wasmrelay_protocol as protocol;
pub use wasmrelay_protocol::{Encoding, Msg};

use quic::QuicFrame;

/// How to connect: who we are and how we trust the relay.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sent as `hello.client`; shows in the relay's connection table.
    pub name: String,
    /// Sent as `hello.token`; the relay's policy decides who that is.
    pub token: Option<String>,
    /// Also put the token in a WebSocket URL's query, so admission sees it
    /// before the upgrade (per-user connection caps apply from the start).
    pub token_in_url: bool,
    /// How to trust the relay's certificate (QUIC, `wss://`).
    pub trust: Trust,
    /// The TLS name to verify when it is not the URL's host.
    pub server_name: Option<String>,
    /// WebSocket frames: JSON text (default) or binary (payloads as raw bytes).
    /// QUIC always speaks binary frames.
    pub encoding: Encoding,
    /// Ask the relay to put several messages in one WebSocket frame
    /// (`hello.batch`, PROTOCOL §2.1): far fewer frames under load. On by
    /// default; [`Receiver`] splits batches, so callers see single messages.
    pub batch: bool,
    /// The session of a previous connection (`hello.resume`): the uploads it
    /// left unfinished come back in `welcome.transfers`.
    pub resume: Option<String>,
}

impl Options {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            token: None,
            token_in_url: false,
            trust: Trust::default(),
            server_name: None,
            encoding: Encoding::Text,
            batch: true,
            resume: None,
        }
    }

    pub fn token(mut self, token: Option<impl Into<String>>) -> Self {
        self.token = token.map(Into::into);
        self
    }

    pub fn trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }

    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    pub fn batch(mut self, batch: bool) -> Self {
        self.batch = batch;
        self
    }
}

/// A greeted connection to a relay.
pub struct Client {
    sender: Sender,
    receiver: Receiver,
    welcome: Msg,
    /// Messages that arrived while a helper waited for its answer.
    pending: VecDeque<Msg>,
    next_id: u64,
    /// Where [`Client::reconnect`] connects, and how.
    url: String,
    options: Options,
    /// Channels subscribed to, resubscribed on reconnect.
    channels: BTreeSet<String>,
    /// Per channel with history: its epoch and the last seq received.
    positions: HashMap<String, Position>,
}

impl Client {
    /// Connects to `url` — `ws://HOST:PORT/ws`, `wss://HOST[:PORT]/ws` or
    /// `quic://HOST:PORT` — and completes `hello`.
    pub async fn connect(url: &str, options: Options) -> Result<Self, Error> {
        let (sender, receiver, welcome) = Self::open(url, &options).await?;
        Ok(Self {
            sender,
            receiver,
            welcome,
            pending: VecDeque::new(),
            next_id: 0,
            url: url.to_owned(),
            options,
            channels: BTreeSet::new(),
            positions: HashMap::new(),
        })
    }

    /// Connects again after the connection dropped (or to move to a fresh
    /// one): resumes this session (`hello.resume`) and resubscribes every
    /// channel, asking channels with history to recover what was missed.
    /// What each channel said comes back; one with `recovered: Some(false)`
    /// lost messages for good, and the application should resync it (from
    /// its own source, or with a `history` request). Messages received but
    /// not yet taken with [`Client::recv`] are kept.
    pub async fn reconnect(&mut self) -> Result<Vec<(String, Subscribed)>, Error> {
        let mut options = self.options.clone();
        options.resume = Some(self.session().to_owned());
        let (sender, receiver, welcome) = Self::open(&self.url, &options).await?;
        self.sender = sender;
        self.receiver = receiver;
        self.welcome = welcome;
        let mut answers = Vec::new();
        for channel in self.channels.clone() {
            let from = self.positions.get(&channel).cloned();
            let answer = self.subscribe_from(&channel, from).await?;
            answers.push((channel, answer));
        }
        Ok(answers)
    }

    /// Where this client is in `channel`, if the channel keeps history:
    /// the epoch and the last seq received.
    pub fn position(&self, channel: &str) -> Option<&Position> {
        self.positions.get(channel)
    }

    async fn open(url: &str, options: &Options) -> Result<(Sender, Receiver, Msg), Error> {
        let (mut sender, mut receiver) = if let Some(authority) = url.strip_prefix("quic://") {
            let link = quic::connect(
                authority.trim_end_matches('/'),
                options.server_name.as_deref(),
                &options.trust,
            )
            .await?;
            (
                Sender {
                    link: SendLink::Quic {
                        endpoint: link.endpoint,
                        connection: link.connection,
                        control: link.control,
                        transfers: Default::default(),
                    },
                    encoding: Encoding::Binary,
                },
                Receiver::new(RecvLink::Quic(link.inbox)),
            )
        } else {
            let url = match (&options.token, options.token_in_url) {
                (Some(token), true) => format!("{url}?token={token}"),
                _ => url.to_owned(),
            };
            let (sink, source) =
                ws::connect(&url, options.server_name.as_deref(), &options.trust).await?;
            (
                Sender {
                    link: SendLink::Ws(sink),
                    encoding: options.encoding,
                },
                Receiver::new(RecvLink::Ws(source)),
            )
        };
        sender
            .send(&Msg::Hello {
                v: VERSION,
                client: Some(options.name.clone()),
                token: options.token.clone(),
                batch: options.batch,
                resume: options.resume.clone(),
            })
            .await?;
        let welcome = match receiver.recv().await? {
            Some(welcome @ Msg::Welcome { batch, .. }) => {
                // Every frame after the welcome is batched when it says so.
                receiver.batched = batch;
                welcome
            }
            Some(Msg::Error { code, message, .. }) => return Err(Error::Relay { code, message }),
            Some(other) => {
                return Err(Error::Unexpected {
                    expected: "welcome",
                    got: other.kind().to_owned(),
                });
            }
            None => return Err(Error::Closed { during: "hello" }),
        };
        Ok((sender, receiver, welcome))
    }

    /// The relay's answer to our `hello`.
    pub fn welcome(&self) -> &Msg {
        &self.welcome
    }

    /// The session id the relay gave this connection.
    pub fn session(&self) -> &str {
        match &self.welcome {
            Msg::Welcome { session, .. } => session,
            _ => "",
        }
    }

    pub async fn send(&mut self, msg: &Msg) -> Result<(), Error> {
        self.sender.send(msg).await
    }

    /// The next protocol message; `None` once the relay has closed the connection.
    pub async fn recv(&mut self) -> Result<Option<Msg>, Error> {
        match self.pending.pop_front() {
            Some(msg) => Ok(Some(msg)),
            None => {
                let msg = self.receiver.recv().await?;
                if let Some(msg) = &msg {
                    self.note(msg);
                }
                Ok(msg)
            }
        }
    }

    /// Keeps this client's position in a channel with history current.
    fn note(&mut self, msg: &Msg) {
        if let Msg::Message { channel, seq, .. } = msg
            && let Some(position) = self.positions.get_mut(channel)
        {
            position.seq = position.seq.max(*seq);
        }
    }

    /// Subscribes to `channel`; returns its last sequence number,
    /// subscriber count and (with history) epoch.
    pub async fn subscribe(&mut self, channel: &str) -> Result<Subscribed, Error> {
        self.subscribe_from(channel, None).await
    }

    /// Subscribes to `channel`, asking to recover everything after `from`
    /// (an epoch and the last seq seen): when the answer says `recovered:
    /// Some(true)`, the missed messages follow through [`Client::recv`]
    /// before any live one.
    pub async fn subscribe_from(
        &mut self,
        channel: &str,
        from: Option<Position>,
    ) -> Result<Subscribed, Error> {
        self.send(&Msg::Subscribe {
            channel: channel.to_owned(),
            recover: from.clone(),
        })
        .await?;
        let answer = self
            .answer("subscribed", |msg| match msg {
                Msg::Subscribed {
                    channel: c,
                    seq,
                    presence,
                    epoch,
                    recovered,
                } if c == channel => Answer::Done(Subscribed {
                    seq: *seq,
                    presence: *presence,
                    epoch: epoch.clone(),
                    recovered: *recovered,
                }),
                Msg::Error { id: None, .. } => Answer::Failed,
                _ => Answer::NotMine,
            })
            .await?;
        self.channels.insert(channel.to_owned());
        match (&answer.epoch, answer.recovered, from) {
            // Recovered: the missed messages follow; we are still at `from`
            // until they are received.
            (Some(_), Some(true), Some(from)) => {
                self.positions.insert(channel.to_owned(), from);
            }
            (Some(epoch), _, _) => {
                self.positions.insert(
                    channel.to_owned(),
                    Position {
                        epoch: epoch.clone(),
                        seq: answer.seq,
                    },
                );
            }
            (None, _, _) => {
                self.positions.remove(channel);
            }
        }
        Ok(answer)
    }

    /// Unsubscribes from `channel` (and forgets it for [`Client::reconnect`]).
    pub async fn unsubscribe(&mut self, channel: &str) -> Result<(), Error> {
        self.channels.remove(channel);
        self.positions.remove(channel);
        self.send(&Msg::Unsubscribe {
            channel: channel.to_owned(),
        })
        .await?;
        self.answer("unsubscribed", |msg| match msg {
            Msg::Unsubscribed { channel: c } if c == channel => Answer::Done(()),
            Msg::Error { id: None, .. } => Answer::Failed,
            _ => Answer::NotMine,
        })
        .await
    }

    /// A page of `channel`'s history: the messages after `since`, or the
    /// last `limit` (PROTOCOL §5.1).
    pub async fn history(
        &mut self,
        channel: &str,
        since: Option<u64>,
        limit: Option<u32>,
    ) -> Result<Msg, Error> {
        let id = self.fresh_id();
        self.send(&Msg::History {
            id: id.clone(),
            channel: channel.to_owned(),
            since,
            limit,
        })
        .await?;
        self.answer("history_page", |msg| match msg {
            Msg::HistoryPage { id: i, .. } if *i == id => Answer::Done(msg.clone()),
            Msg::Error { id: Some(i), .. } if *i == id => Answer::Failed,
            _ => Answer::NotMine,
        })
        .await
    }

    /// Publishes `data` to `channel`; returns the sequence number it got.
    pub async fn publish(&mut self, channel: &str, data: impl Into<Data>) -> Result<u64, Error> {
        let id = self.fresh_id();
        self.send(&Msg::Publish {
            channel: channel.to_owned(),
            id: Some(id.clone()),
            data: data.into(),
        })
        .await?;
        self.answer("ack", |msg| match msg {
            Msg::Ack { id: i, seq, .. } if *i == id => Answer::Done(*seq),
            Msg::Error { id: Some(i), .. } if *i == id => Answer::Failed,
            _ => Answer::NotMine,
        })
        .await
    }

    /// Sends a request to a space and waits for its response, handing each
    /// progress event to `on_progress`. An empty `request.id` gets a fresh one.
    pub async fn request(
        &mut self,
        mut request: Request,
        mut on_progress: impl FnMut(Option<f32>, &Data),
    ) -> Result<Response, Error> {
        if request.id.is_empty() {
            request.id = self.fresh_id();
        }
        let id = request.id.clone();
        self.send(&Msg::Request(request)).await?;
        self.answer("response", |msg| match msg {
            Msg::Progress {
                id: i,
                percent,
                data,
            } if *i == id => {
                on_progress(*percent, data);
                Answer::Consumed
            }
            Msg::Response(response) if response.id == id => Answer::Done(response.clone()),
            Msg::Error { id: Some(i), .. } if *i == id => Answer::Failed,
            _ => Answer::NotMine,
        })
        .await
    }

    /// Registers as an instance of `space`; returns the instance id.
    /// [`serve`] does this and then serves requests.
    pub async fn register(&mut self, space: &str) -> Result<String, Error> {
        self.send(&Msg::Register {
            space: space.to_owned(),
        })
        .await?;
        let answer = self
            .answer("registered", |msg| match msg {
                Msg::Registered { space: s, instance } if s == space => {
                    Answer::Done(instance.clone())
                }
                Msg::Error { id: None, .. } => Answer::Failed,
                _ => Answer::NotMine,
            })
            .await;
        match answer {
            Err(Error::Relay { code, message }) if refuses_registration(code) => {
                Err(Error::Refused {
                    space: space.to_owned(),
                    code,
                    message,
                })
            }
            other => other,
        }
    }

    /// How often an instance connected over QUIC must say something so the
    /// relay does not take it for gone (PROTOCOL §3.2); `None` over
    /// WebSocket, where the relay's pings do that.
    pub fn instance_ping_every(&self) -> Option<Duration> {
        match (&self.sender.link, &self.welcome) {
            (
                SendLink::Quic { .. },
                Msg::Welcome {
                    instance_idle_timeout_ms,
                    ..
                },
            ) if *instance_idle_timeout_ms > 0 => {
                Some(Duration::from_millis(instance_idle_timeout_ms / 4))
            }
            _ => None,
        }
    }

    /// The sending and receiving halves, for separate tasks. Messages a
    /// helper had set aside are dropped; split before using helpers.
    pub fn split(self) -> (Sender, Receiver) {
        (self.sender, self.receiver)
    }

    /// Closes cleanly, so the relay learns at once rather than by timeout.
    pub async fn close(self) -> Result<(), Error> {
        self.sender.close().await
    }

    /// Closes the connection but keeps what [`Client::reconnect`] needs
    /// (subscriptions, positions, the session); sends fail and `recv`
    /// ends until then. For going offline on purpose, and for tests.
    pub async fn disconnect(&mut self) -> Result<(), Error> {
        let encoding = self.sender.encoding;
        let sender = std::mem::replace(
            &mut self.sender,
            Sender {
                link: SendLink::Closed,
                encoding,
            },
        );
        self.receiver = Receiver::new(RecvLink::Closed);
        sender.close().await
    }

    fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("c{}", self.next_id)
    }

    /// Receives until `classify` recognises the answer, setting aside what
    /// is not its. An `error` it claims becomes [`Error::Relay`].
    async fn answer<T>(
        &mut self,
        expected: &'static str,
        mut classify: impl FnMut(&Msg) -> Answer<T>,
    ) -> Result<T, Error> {
        let mut set_aside = VecDeque::new();
        let result = loop {
            let Some(msg) = self.receiver.recv().await? else {
                break Err(Error::Closed { during: expected });
            };
            self.note(&msg);
            match classify(&msg) {
                Answer::Done(value) => break Ok(value),
                Answer::Consumed => {}
                Answer::Failed => match msg {
                    Msg::Error { code, message, .. } => break Err(Error::Relay { code, message }),
                    other => {
                        break Err(Error::Unexpected {
                            expected,
                            got: other.kind().to_owned(),
                        });
                    }
                },
                Answer::NotMine => set_aside.push_back(msg),
            }
        };
        self.pending.extend(set_aside);
        result
    }
}

enum Answer<T> {
    Done(T),
    Failed,
    /// Part of the answer's stream (a progress event), handled.
    Consumed,
    NotMine,
}

/// A channel's state when we subscribed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    pub seq: u64,
    pub presence: u64,
    /// The channel's epoch, when it keeps history.
    pub epoch: Option<String>,
    /// When we asked to recover: whether everything missed follows.
    pub recovered: Option<bool>,
}

enum SendLink {
    Ws(ws::WsSink),
    Quic {
        // The endpoint drives the connection: it lives as long as we send.
        endpoint: quinn::Endpoint,
        connection: quinn::Connection,
        control: quinn::SendStream,
        /// Each upload's chunks go on a stream of its own (PROTOCOL §6.4),
        /// finished after its last chunk.
        transfers: std::collections::HashMap<String, quinn::SendStream>,
    },
    /// After [`Client::disconnect`].
    Closed,
}

/// The sending half of a connection.
pub struct Sender {
    link: SendLink,
    encoding: Encoding,
}

impl Sender {
    /// Sends one message (over QUIC, a bulk body on a stream of its own).
    pub async fn send(&mut self, msg: &Msg) -> Result<(), Error> {
        match (&mut self.link, self.encoding) {
            (SendLink::Ws(sink), Encoding::Text) => {
                sink.send(Message::Text(codec::encode_text(msg).into()))
                    .await?;
            }
            (SendLink::Ws(sink), _) => {
                sink.send(Message::Binary(codec::encode_binary(msg)))
                    .await?;
            }
            (SendLink::Quic { transfers, .. }, _) if matches!(msg, Msg::CancelTransfer { .. }) => {
                if let Msg::CancelTransfer { id } = msg
                    && let Some(mut stream) = transfers.remove(id)
                {
                    let _ = stream.reset(wasmrelay_protocol::quic::stream_code::ABORTED.into());
                }
                self.feed_quic(codec::encode_binary(msg), false).await?;
            }
            (SendLink::Quic { .. }, _) if matches!(msg, Msg::Chunk { .. }) => {
                self.send_chunk_quic(msg).await?;
            }
            (SendLink::Quic { .. }, _) => {
                let bulk = is_bulk(msg);
                self.feed_quic(codec::encode_binary(msg), bulk).await?;
            }
            (SendLink::Closed, _) => return Err(Error::Closed { during: msg.kind() }),
        }
        Ok(())
    }

    /// A chunk over QUIC: on its transfer's own stream.
    async fn send_chunk_quic(&mut self, msg: &Msg) -> Result<(), Error> {
        let (
            SendLink::Quic {
                connection,
                transfers,
                ..
            },
            Msg::Chunk { id, last, .. },
        ) = (&mut self.link, msg)
        else {
            return Ok(());
        };
        let stream = match transfers.entry(id.clone()) {
            std::collections::hash_map::Entry::Occupied(open) => open.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(connection.open_uni().await?)
            }
        };
        write_frame(stream, codec::encode_binary(msg)).await?;
        if *last && let Some(mut stream) = transfers.remove(id) {
            stream.finish()?;
        }
        Ok(())
    }

    /// Queues one binary message already encoded (PROTOCOL.md §2); over
    /// WebSocket it leaves on [`Sender::flush`]. Over QUIC a message of
    /// `BULK_THRESHOLD` bytes or more gets a stream of its own. For load
    /// generators that encode once and send many times.
    pub async fn feed(&mut self, message: Bytes) -> Result<(), Error> {
        match &mut self.link {
            SendLink::Ws(sink) => sink.feed(Message::Binary(message)).await?,
            SendLink::Quic { .. } => {
                let bulk = message.len() >= BULK_THRESHOLD;
                self.feed_quic(message, bulk).await?;
            }
            SendLink::Closed => return Err(Error::Closed { during: "feed" }),
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), Error> {
        if let SendLink::Ws(sink) = &mut self.link {
            sink.flush().await?;
        }
        Ok(())
    }

    async fn feed_quic(&mut self, message: Bytes, bulk: bool) -> Result<(), Error> {
        let SendLink::Quic {
            connection,
            control,
            ..
        } = &mut self.link
        else {
            return Ok(());
        };
        if bulk {
            let mut stream = connection.open_uni().await?;
            write_frame(&mut stream, message).await?;
            stream.finish()?;
        } else {
            control.write_all(&frame(&message)).await?;
        }
        Ok(())
    }

    /// Closes cleanly, so the relay learns at once rather than by timeout.
    pub async fn close(self) -> Result<(), Error> {
        match self.link {
            SendLink::Ws(mut sink) => sink.close().await?,
            SendLink::Quic {
                endpoint,
                connection,
                mut control,
                ..
            } => {
                let _ = control.finish();
                connection.close(0u32.into(), b"bye");
                // Bounded: an unreachable relay never acknowledges the close.
                let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            }
            SendLink::Closed => {}
        }
        Ok(())
    }
}

enum RecvLink {
    Ws(ws::WsSource),
    Quic(mpsc::Receiver<Result<QuicFrame, FrameError>>),
    /// After [`Client::disconnect`].
    Closed,
}

/// One message as it arrived, undecoded (a batched frame's messages come
/// one by one).
#[derive(Debug, Clone)]
pub struct Frame {
    pub bytes: Bytes,
    /// A WebSocket text frame (JSON); otherwise the binary layout.
    pub text: bool,
}

impl Frame {
    pub fn decode(&self) -> Result<Msg, Error> {
        if self.text {
            let text = std::str::from_utf8(&self.bytes)
                .map_err(|e| Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
            Ok(codec::decode_text(text)?)
        } else {
            Ok(codec::decode_binary(&self.bytes)?)
        }
    }
}

/// The receiving half of a connection.
pub struct Receiver {
    link: RecvLink,
    /// The relay batches its frames (its `welcome` said `batch: true`).
    batched: bool,
    /// The rest of the last batched frame.
    unread: VecDeque<Frame>,
}

impl Receiver {
    fn new(link: RecvLink) -> Self {
        Self {
            link,
            batched: false,
            unread: VecDeque::new(),
        }
    }

    /// The next message; `None` once the relay has closed the connection.
    pub async fn recv(&mut self) -> Result<Option<Msg>, Error> {
        match self.recv_frame().await? {
            Some(frame) => frame.decode().map(Some),
            None => Ok(None),
        }
    }

    /// The next message, undecoded; `None` once the relay has closed the
    /// connection.
    pub async fn recv_frame(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            if let Some(frame) = self.unread.pop_front() {
                return Ok(Some(frame));
            }
            let Some(frame) = self.next_frame().await? else {
                return Ok(None);
            };
            if !self.batched {
                return Ok(Some(frame));
            }
            let messages = if frame.text {
                batch::split_text(&frame.bytes)
            } else {
                batch::split_binary(&frame.bytes)?
            };
            let text = frame.text;
            self.unread
                .extend(messages.into_iter().map(|bytes| Frame { bytes, text }));
        }
    }

    /// The next frame off the wire.
    async fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        match &mut self.link {
            RecvLink::Ws(source) => {
                while let Some(frame) = source.next().await {
                    match frame? {
                        Message::Text(text) => {
                            return Ok(Some(Frame {
                                bytes: Bytes::from(text),
                                text: true,
                            }));
                        }
                        Message::Binary(bytes) => {
                            return Ok(Some(Frame { bytes, text: false }));
                        }
                        Message::Close(_) => return Ok(None),
                        // Pings are answered by tungstenite itself.
                        _ => continue,
                    }
                }
                Ok(None)
            }
            RecvLink::Quic(inbox) => match inbox.recv().await {
                Some(Ok(frame)) => Ok(Some(Frame {
                    bytes: frame.message,
                    text: false,
                })),
                None | Some(Err(FrameError::Lost)) => Ok(None),
                Some(Err(e)) => Err(e.into()),
            },
            RecvLink::Closed => Ok(None),
        }
    }
}

/// Whether an error code means the relay will not accept this registration
/// however often it is retried.
pub(crate) fn refuses_registration(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Forbidden | ErrorCode::UnknownSpace | ErrorCode::InvalidName
    )
}
