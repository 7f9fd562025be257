//! Channel history and recovery (PROTOCOL §5.1): a client that comes back
//! gets exactly what it missed, in order and before live messages, or is
//! told it cannot; history stays within its memory bound; a restart with a
//! persistent store keeps the epoch. Real relays, the real Rust client.

use std::time::Duration;

use serde_json::Value;
use wasmrelay_client::protocol::Position;
use wasmrelay_client::{Client, Msg};
use wasmrelay_tests::{RelayProcess, TestRelay, Via, admin_client};

use super::transfers::{connect, next};

/// The seq of the next channel message on `channel` (skipping presence
/// counts and heartbeats).
async fn next_message(client: &mut Client, channel: &str) -> (u64, String) {
    loop {
        if let Msg::Message {
            channel: c,
            seq,
            data,
        } = next(client).await
            && c == channel
        {
            return (seq, String::from_utf8_lossy(data.as_bytes()).into_owned());
        }
    }
}

async fn publish_n(publisher: &mut Client, channel: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        publisher.publish(channel, format!("m{n}")).await.unwrap();
    }
}

/// The subscriber drops; 50 are published; `reconnect` resubscribes with
/// its epoch and seq and receives exactly those 50 in order, then live ones.
async fn reconnecting_recovers_exactly_the_missed_messages(via: Via) {
    let relay = TestRelay::start().await;
    let mut publisher = connect(&relay, via, None, None).await;
    let mut subscriber = connect(&relay, via, None, None).await;
    let subscribed = subscriber.subscribe("chat/lobby").await.unwrap();
    assert!(
        subscribed.epoch.is_some(),
        "chat/* keeps history by default"
    );
    publish_n(&mut publisher, "chat/lobby", 1..=3).await;
    for n in 1..=3 {
        assert_eq!(next_message(&mut subscriber, "chat/lobby").await.0, n);
    }
    // The connection drops: the relay sees it go before the 50 are sent.
    let old_session = subscriber.session().to_owned();
    subscriber.disconnect().await.unwrap();
    wait_presence(&relay, "chat/lobby", 0).await;
    publish_n(&mut publisher, "chat/lobby", 4..=53).await;

    let answers = subscriber.reconnect().await.unwrap();
    assert_ne!(subscriber.session(), old_session);
    assert_eq!(answers.len(), 1);
    let (channel, answer) = &answers[0];
    assert_eq!(channel, "chat/lobby");
    assert_eq!(answer.recovered, Some(true), "{answer:?}");
    assert_eq!(answer.epoch, subscribed.epoch);
    assert_eq!(answer.seq, 53);
    publish_n(&mut publisher, "chat/lobby", 54..=55).await;
    for n in 4..=55 {
        let (seq, data) = next_message(&mut subscriber, "chat/lobby").await;
        assert_eq!((seq, data), (n, format!("m{n}")), "in order, none twice");
    }
    assert_eq!(subscriber.position("chat/lobby").unwrap().seq, 55);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_websocket_subscriber_that_reconnects_recovers_exactly_what_it_missed() {
    reconnecting_recovers_exactly_the_missed_messages(Via::Ws).await;
}

#[tokio::test]
async fn a_quic_subscriber_that_reconnects_recovers_exactly_what_it_missed() {
    reconnecting_recovers_exactly_the_missed_messages(Via::Quic).await;
}

async fn wait_presence(relay: &TestRelay, channel: &str, count: u64) {
    let mut probe = connect(relay, Via::Ws, None, None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Our own subscribe counts us too.
        let found = probe.subscribe(channel).await.unwrap();
        probe.unsubscribe(channel).await.unwrap();
        if found.presence == count + 1 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence of {channel} never fell to {count}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_gap_longer_than_the_history_or_another_epoch_is_not_recovered() {
    let relay = TestRelay::start_with(|c| {
        c.channels.history[0].size = 10;
    })
    .await;
    let mut publisher = connect(&relay, Via::Ws, None, None).await;
    publish_n(&mut publisher, "chat/short", 1..=30).await;
    let mut client = connect(&relay, Via::Ws, None, None).await;
    let Msg::HistoryPage { epoch, seq, .. } =
        client.history("chat/short", None, Some(1)).await.unwrap()
    else {
        unreachable!()
    };
    assert_eq!(seq, 30);
    // 11..=30 are kept at most: from 5, the gap is not all there.
    let answer = client
        .subscribe_from(
            "chat/short",
            Some(Position {
                epoch: epoch.clone(),
                seq: 5,
            }),
        )
        .await
        .unwrap();
    assert_eq!(answer.recovered, Some(false));
    assert_eq!(answer.epoch.as_deref(), Some(epoch.as_str()));
    // A stale epoch (the channel's sequence restarted) is not recovered either.
    let mut other = connect(&relay, Via::Ws, None, None).await;
    let answer = other
        .subscribe_from(
            "chat/short",
            Some(Position {
                epoch: "0000000000000000".into(),
                seq: 29,
            }),
        )
        .await
        .unwrap();
    assert_eq!(answer.recovered, Some(false));
    // Neither got a partial gap: the next message each sees is live.
    publisher.publish("chat/short", "live").await.unwrap();
    assert_eq!(next_message(&mut client, "chat/short").await.0, 31);
    assert_eq!(next_message(&mut other, "chat/short").await.0, 31);
    relay.stop().await.unwrap();
}

/// Publishes keep coming while clients recover: each sees every seq after
/// its position exactly once, in order.
#[tokio::test]
async fn recovery_racing_with_publishes_neither_duplicates_nor_loses() {
    let relay = TestRelay::start_with(|c| c.channels.history[0].size = 1000).await;
    let mut publisher = connect(&relay, Via::Ws, None, None).await;
    publish_n(&mut publisher, "chat/race", 1..=100).await;
    let mut reader = connect(&relay, Via::Ws, None, None).await;
    let Msg::HistoryPage { epoch, .. } = reader.history("chat/race", None, Some(1)).await.unwrap()
    else {
        unreachable!()
    };
    const TOTAL: u64 = 600;
    let publishing = tokio::spawn(async move {
        publish_n(&mut publisher, "chat/race", 101..=TOTAL).await;
        publisher
    });
    let mut recovering = Vec::new();
    for (i, from) in [10u64, 40, 70, 95].into_iter().enumerate() {
        let mut client = connect(&relay, Via::Ws, None, None).await;
        let answer = client
            .subscribe_from(
                "chat/race",
                Some(Position {
                    epoch: epoch.clone(),
                    seq: from,
                }),
            )
            .await
            .unwrap();
        assert_eq!(answer.recovered, Some(true), "client {i}");
        recovering.push((from, client));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _publisher = publishing.await.unwrap();
    for (from, mut client) in recovering {
        for expected in from + 1..=TOTAL {
            assert_eq!(next_message(&mut client, "chat/race").await.0, expected);
        }
    }
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn history_memory_stays_within_its_bound_across_many_channels() {
    const BOUND: usize = 256 * 1024;
    let relay = TestRelay::start_with(|c| c.channels.history_memory_bytes = BOUND).await;
    let mut publisher = connect(&relay, Via::Ws, None, None).await;
    let payload = "x".repeat(2000);
    for round in 0..5 {
        for c in 0..100 {
            publisher
                .publish(&format!("chat/many-{c}"), payload.clone())
                .await
                .unwrap();
        }
        let stats: Value = admin_client()
            .get(relay.url("/admin/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let used = stats["history"]["bytes"].as_u64().unwrap() as usize;
        assert_eq!(stats["history"]["budget_bytes"], BOUND);
        assert!(used <= BOUND, "round {round}: {used} > {BOUND}");
        assert!(
            used > BOUND / 2,
            "round {round}: histories are kept ({used})"
        );
    }
    // The newest message of every channel is still there.
    for c in [0, 50, 99] {
        let Msg::HistoryPage { seq, messages, .. } = publisher
            .history(&format!("chat/many-{c}"), None, Some(1))
            .await
            .unwrap()
        else {
            unreachable!()
        };
        assert_eq!(seq, 5);
        assert_eq!(messages.last().map(|m| m.seq), Some(5));
    }
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn history_pages_and_members_answer_and_refuse_with_documented_codes() {
    let relay =
        TestRelay::start_with(|c| c.channels.presence_details = vec!["chat/*".into()]).await;
    let mut client = connect(&relay, Via::Ws, None, None).await;
    publish_n(&mut client, "chat/pages", 1..=25).await;
    let Msg::HistoryPage {
        seq,
        complete,
        more,
        messages,
        ..
    } = client
        .history("chat/pages", Some(10), Some(5))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(seq, 25);
    assert!(complete && more);
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [11, 12, 13, 14, 15]
    );
    // A channel without history: not_found, and the connection carries on.
    let err = client.history("room", None, None).await.unwrap_err();
    assert!(err.to_string().contains("not_found"), "{err}");
    client.subscribe("chat/pages").await.unwrap();
    client
        .send(&Msg::Who {
            id: "w1".into(),
            channel: "chat/pages".into(),
        })
        .await
        .unwrap();
    let members = loop {
        if let Msg::Members {
            id, count, members, ..
        } = next(&mut client).await
        {
            assert_eq!(id, "w1");
            assert_eq!(count, 1);
            break members;
        }
    };
    assert_eq!(members[0].session, client.session());
    client
        .send(&Msg::Who {
            id: "w2".into(),
            channel: "room".into(),
        })
        .await
        .unwrap();
    loop {
        if let Msg::Error { code, id, .. } = next(&mut client).await {
            assert_eq!(code.to_string(), "forbidden");
            assert_eq!(id.as_deref(), Some("w2"));
            break;
        }
    }
    client.publish("chat/pages", "still here").await.unwrap();
    relay.stop().await.unwrap();
}

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");

/// A client of a relay process with the demo policy, in its `vip` tier (the
/// guest tier's rates would throttle these bursts).
async fn vip(url: &str) -> Client {
    Client::connect(
        url,
        wasmrelay_client::Options::named("history").token(Some("vip-demo-token")),
    )
    .await
    .unwrap()
}

const PERSISTED: &str = "[channels]\nhistory = [{ pattern = \"chat/*\", size = 100, ttl_ms = 300000, persist = true }]\n";

#[tokio::test]
async fn a_restart_with_persistence_keeps_the_epoch_and_a_crash_changes_it() {
    let relay =
        RelayProcess::start_configured(RELAY, wasmrelay_tests::free_port(), PERSISTED, &[]).await;
    let url = relay.client_url(Via::Ws);
    let mut client = vip(&url).await;
    let first = client.subscribe("chat/kept").await.unwrap();
    publish_n(&mut client, "chat/kept", 1..=10).await;
    client.close().await.unwrap();

    let relay = relay.restart_gracefully().await;
    let mut client = vip(&url).await;
    let answer = client
        .subscribe_from(
            "chat/kept",
            Some(Position {
                epoch: first.epoch.clone().unwrap(),
                seq: 5,
            }),
        )
        .await
        .unwrap();
    assert_eq!(answer.recovered, Some(true), "{answer:?}");
    assert_eq!(
        answer.epoch, first.epoch,
        "the epoch survives a clean restart"
    );
    for n in 6..=10 {
        assert_eq!(
            next_message(&mut client, "chat/kept").await,
            (n, format!("m{n}"))
        );
    }
    client.close().await.unwrap();

    // A crash may lose the last writes: the epoch must change.
    let relay = relay.restart().await;
    let mut client = vip(&url).await;
    let after_crash = client.subscribe("chat/kept").await.unwrap();
    assert_ne!(after_crash.epoch, first.epoch);
    drop(relay);
}

/// The bundled router (path-router, in the demo configuration) overrides
/// `channels.history`: `news/` keeps 20 messages though no rule names it,
/// `chat/ephemeral/` keeps none though `chat/*` does.
#[tokio::test]
async fn the_router_plugin_decides_which_channels_keep_history() {
    let relay = RelayProcess::start(RELAY, &[]).await;
    let url = relay.client_url(Via::Ws);
    let mut client = vip(&url).await;
    let chat = client.subscribe("chat/room").await.unwrap();
    assert!(chat.epoch.is_some(), "the configuration keeps chat/*");
    let ephemeral = client.subscribe("chat/ephemeral/room").await.unwrap();
    assert_eq!(
        ephemeral.epoch, None,
        "the router keeps none under chat/ephemeral/"
    );
    let err = client
        .history("chat/ephemeral/room", None, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not_found"), "{err}");
    publish_n(&mut client, "news/today", 1..=25).await;
    let Msg::HistoryPage { seq, messages, .. } =
        client.history("news/today", Some(0), None).await.unwrap()
    else {
        unreachable!()
    };
    assert_eq!(seq, 25);
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (6..=25).collect::<Vec<_>>(),
        "the router's size: 20"
    );
    client.close().await.unwrap();
    drop(relay);
}
