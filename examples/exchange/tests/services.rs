//! The three services together, over SQLite and over a real PostgreSQL: register →
//! log in → crossing orders → both users get their fills on the WebSocket; bad
//! input; idempotency; resuming a feed; matching safety under concurrent writers;
//! draining; and the trader client's own checks.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Services, account, call, feed, next_events};
use exchange::model::{NewOrder, Side};
use exchange::store::Store;
use futures_util::StreamExt;

async fn journey(s: &Services) {
    // Bad input is refused with the field named, and changes nothing.
    let r = call(
        "POST",
        &format!("{}/register", s.user),
        None,
        None,
        Some(serde_json::json!({"username": "x", "password": "long enough pw"})),
    )
    .await;
    assert_eq!(
        (r.status, r.body["field"].as_str()),
        (400, Some("username")),
        "{}",
        r.body
    );
    let r = call(
        "POST",
        &format!("{}/register", s.user),
        None,
        None,
        Some(serde_json::json!({"username": "alice", "password": 5})),
    )
    .await;
    assert_eq!(
        (r.status, r.body["field"].as_str()),
        (400, Some("password")),
        "{}",
        r.body
    );

    let (alice, alice_id) = account(s, "alice").await;
    let (bob, bob_id) = account(s, "bob").await;
    let r = call(
        "POST",
        &format!("{}/register", s.user),
        None,
        None,
        Some(serde_json::json!({"username": "alice", "password": "another password"})),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = call(
        "POST",
        &format!("{}/login", s.user),
        None,
        None,
        Some(serde_json::json!({"username": "alice", "password": "wrong password"})),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = call(
        "GET",
        &format!("{}/users/me", s.user),
        Some(&alice),
        None,
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.body["username"].as_str()),
        (200, Some("alice"))
    );
    let r = call(
        "GET",
        &format!("{}/users/me", s.user),
        Some("forged.token.here"),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 401);

    let mut alice_feed = feed(s, &alice, 0).await;
    let mut bob_feed = feed(s, &bob, 0).await;

    let orders = format!("{}/orders", s.trade);
    let order = |market: &str, side: &str, price: i64, qty: i64| serde_json::json!({"market": market, "side": side, "price": price, "qty": qty});
    for (body, field) in [
        (order("DOGE-USD", "buy", 100, 1), "market"),
        (order("BTC-USD", "hold", 100, 1), "side"),
        (order("BTC-USD", "buy", 0, 1), "price"),
        (order("BTC-USD", "buy", 100, -1), "qty"),
    ] {
        let r = call("POST", &orders, Some(&alice), Some("bad"), Some(body)).await;
        assert_eq!(
            (r.status, r.body["field"].as_str()),
            (400, Some(field)),
            "{}",
            r.body
        );
    }
    let r = call(
        "POST",
        &orders,
        None,
        None,
        Some(order("BTC-USD", "buy", 100, 1)),
    )
    .await;
    assert_eq!(r.status, 401);

    let r = call(
        "POST",
        &orders,
        Some(&alice),
        Some("a1"),
        Some(order("BTC-USD", "sell", 100, 3)),
    )
    .await;
    assert_eq!(
        (r.status, r.body["order"]["status"].as_str()),
        (201, Some("open")),
        "{}",
        r.body
    );
    let ask_id = r.body["order"]["id"].as_i64().expect("id");
    let r = call(
        "POST",
        &orders,
        Some(&bob),
        Some("b1"),
        Some(order("BTC-USD", "buy", 101, 5)),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let bid_id = r.body["order"]["id"].as_i64().expect("id");
    assert_eq!(r.body["order"]["remaining"], 2);
    let trades = r.body["trades"].as_array().expect("trades").clone();
    assert_eq!(trades.len(), 1);
    assert_eq!(
        (trades[0]["price"].as_i64(), trades[0]["qty"].as_i64()),
        (Some(100), Some(3)),
        "maker's price"
    );
    let trade_id = trades[0]["id"].as_i64().expect("trade id");

    // A retry with the same key answers the same order and makes nothing new.
    let r = call(
        "POST",
        &orders,
        Some(&bob),
        Some("b1"),
        Some(order("BTC-USD", "buy", 101, 5)),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(r.body["order"]["id"].as_i64(), Some(bid_id));
    assert_eq!(r.body["trades"].as_array().map(Vec::len), Some(1));
    let r = call(
        "POST",
        &orders,
        Some(&bob),
        Some("b1"),
        Some(order("BTC-USD", "buy", 101, 6)),
    )
    .await;
    assert_eq!(
        (r.status, r.body["field"].as_str()),
        (422, Some("Idempotency-Key")),
        "{}",
        r.body
    );
    let r = call("GET", &orders, Some(&bob), None, None).await;
    assert_eq!(
        r.body.as_array().map(Vec::len),
        Some(1),
        "one order for bob: {}",
        r.body
    );

    // Both users hear about the fill, in sequence.
    let a = next_events(&mut alice_feed, 3).await;
    let kinds: Vec<(i64, &str)> = a
        .iter()
        .map(|e| {
            (
                e["seq"].as_i64().unwrap_or(0),
                e["type"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![(1, "order"), (2, "fill"), (3, "order")],
        "{a:?}"
    );
    assert_eq!(
        (
            a[1]["tradeId"].as_i64(),
            a[1]["orderId"].as_i64(),
            a[1]["liquidity"].as_str()
        ),
        (Some(trade_id), Some(ask_id), Some("maker"))
    );
    assert_eq!(a[2]["status"], "filled");
    let b = next_events(&mut bob_feed, 2).await;
    assert_eq!(
        (
            b[0]["seq"].as_i64(),
            b[0]["type"].as_str(),
            b[0]["qty"].as_i64()
        ),
        (Some(1), Some("fill"), Some(3))
    );
    assert_eq!(
        (
            b[1]["seq"].as_i64(),
            b[1]["status"].as_str(),
            b[1]["remaining"].as_i64()
        ),
        (Some(2), Some("open"), Some(2))
    );

    // Cancel once; twice is a conflict; someone else's order does not exist for you.
    let r = call(
        "DELETE",
        &format!("{orders}/{bid_id}"),
        Some(&alice),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    let r = call(
        "DELETE",
        &format!("{orders}/{bid_id}"),
        Some(&bob),
        None,
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("cancelled"))
    );
    let r = call(
        "DELETE",
        &format!("{orders}/{bid_id}"),
        Some(&bob),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 409);

    // Resume: alice leaves at seq 3, misses two events, and gets exactly those.
    drop(alice_feed);
    for k in ["a2", "a3"] {
        let r = call(
            "POST",
            &orders,
            Some(&alice),
            Some(k),
            Some(order("ETH-USD", "sell", 500, 1)),
        )
        .await;
        assert_eq!(r.status, 201);
    }
    let mut alice_feed = feed(s, &alice, 3).await;
    let missed = next_events(&mut alice_feed, 2).await;
    let seqs: Vec<i64> = missed.iter().filter_map(|e| e["seq"].as_i64()).collect();
    assert_eq!(seqs, vec![4, 5]);
    let quiet = tokio::time::timeout(Duration::from_millis(300), alice_feed.next()).await;
    assert!(quiet.is_err(), "nothing more may arrive: {quiet:?}");

    let r = call(
        "GET",
        &format!("{}/book/BTC-USD", s.trade),
        None,
        None,
        None,
    )
    .await;
    assert_eq!(
        r.body["bids"].as_array().map(Vec::len),
        Some(0),
        "the cancelled bid left the book: {}",
        r.body
    );
    let r = call(
        "GET",
        &format!("{}/trades", s.trade),
        Some(&alice),
        None,
        None,
    )
    .await;
    assert_eq!(
        (
            r.body[0]["buyerId"].as_i64(),
            r.body[0]["sellerId"].as_i64()
        ),
        (Some(bob_id), Some(alice_id))
    );
}

/// Several writers (separate store handles, as separate processes have) place
/// crossing orders at once; afterwards quantities balance and the book is not crossed.
async fn no_double_fill(url: &str) {
    let handles: Vec<Store> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(Store::open(url).await.expect("open"));
        }
        v
    };
    let users: Vec<i64> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(
                handles[0]
                    .create_user(&format!("writer{i}"), "x")
                    .await
                    .expect("user"),
            );
        }
        v
    };
    let mut tasks = Vec::new();
    for (w, store) in handles.iter().enumerate() {
        for t in 0..3 {
            let store = store.clone();
            let users = users.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed((w * 10 + t) as u64);
                for n in 0..40 {
                    let new = NewOrder {
                        user_id: users[rng.usize(..users.len())],
                        market: "BTC-USD".into(),
                        side: if rng.bool() { Side::Buy } else { Side::Sell },
                        price: 100 + rng.i64(-3..=3),
                        qty: rng.i64(1..=4),
                        idempotency_key: Some(format!("{w}-{t}-{n}")),
                    };
                    store.place_order(new).await.expect("place");
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let store = &handles[0];
    let mut filled_by_order: HashMap<i64, i64> = HashMap::new();
    let mut all_orders = Vec::new();
    let mut trade_ids = std::collections::HashSet::new();
    for &u in &users {
        for t in store.trades(u).await.expect("trades") {
            if trade_ids.insert(t.id) {
                *filled_by_order.entry(t.buy_order_id).or_default() += t.qty;
                *filled_by_order.entry(t.sell_order_id).or_default() += t.qty;
            }
        }
        all_orders.extend(store.orders(u).await.expect("orders"));
        let events = store.events_since(u, 0, 100_000).await.expect("events");
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let expect: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, expect, "user {u}'s sequence has gaps or repeats");
    }
    assert_eq!(all_orders.len(), 3 * 3 * 40);
    assert!(!trade_ids.is_empty(), "crossing orders must have traded");
    for o in &all_orders {
        let filled = filled_by_order.get(&o.id).copied().unwrap_or(0);
        assert_eq!(
            o.qty - o.remaining,
            filled,
            "order {} filled {} but shows remaining {} of {}",
            o.id,
            filled,
            o.remaining,
            o.qty
        );
        assert!(o.remaining >= 0);
        assert_eq!(
            o.remaining == 0,
            o.status == exchange::model::OrderStatus::Filled,
            "{o:?}"
        );
    }
    let book = store.book("BTC-USD").await.expect("book");
    let best_bid = book
        .iter()
        .filter(|o| o.side == Side::Buy)
        .map(|o| o.price)
        .max();
    let best_ask = book
        .iter()
        .filter(|o| o.side == Side::Sell)
        .map(|o| o.price)
        .min();
    if let (Some(b), Some(a)) = (best_bid, best_ask) {
        assert!(b < a, "the book is crossed: bid {b} ≥ ask {a}");
    }
}

async fn trader_finds_nothing_lost(s: &Services) {
    let cfg = exchange::trader::TraderConfig {
        user_url: s.user.clone(),
        trade_url: s.trade.clone(),
        notify_url: s.notify.clone(),
        traders: 4,
        rate: 60.0,
        duration: Duration::from_secs(2),
        ..Default::default()
    };
    let tally = exchange::trader::run(cfg).await.expect("trader");
    assert!(tally.is_clean(), "{}", tally.render());
    assert!(tally.orders_accepted >= 60, "{}", tally.render());
    assert!(tally.fills_expected > 0, "{}", tally.render());
    assert_eq!(
        tally.orders_accepted,
        tally.orders_sent,
        "{}",
        tally.render()
    );
    assert_eq!(tally.failed_requests, 0, "{}", tally.render());
    assert_eq!(tally.notifications_received, tally.notifications_expected);
}

fn sqlite_url(dir: &tempfile::TempDir, name: &str) -> String {
    format!("sqlite:{}", dir.path().join(name).display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_journey_across_services() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = common::start(&sqlite_url(&dir, "x.db")).await;
    journey(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_concurrent_writers_never_double_fill() {
    let dir = tempfile::tempdir().expect("tempdir");
    no_double_fill(&sqlite_url(&dir, "x.db")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_trader_finds_nothing_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = common::start(&sqlite_url(&dir, "x.db")).await;
    trader_finds_nothing_lost(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_end_to_end() {
    let pg = common::Postgres::start();
    let s = common::start(&pg.database("journey").await).await;
    journey(&s).await;
    no_double_fill(&pg.database("writers").await).await;
    let s = common::start(&pg.database("trader").await).await;
    trader_finds_nothing_lost(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_tells_clients_to_reconnect_with_1012() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = common::start(&sqlite_url(&dir, "x.db")).await;
    let (token, _) = account(&s, "carol").await;
    let mut ws = feed(&s, &token, 0).await;
    let state = s.notify_state.clone();
    let drained = tokio::spawn(async move {
        let started = std::time::Instant::now();
        state.drain(Duration::from_secs(20)).await;
        started.elapsed()
    });
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("close within 10 s")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("feed ended without a close frame: {other:?}"),
        }
    };
    let frame = close.expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 1012, "service restart");
    drop(ws);
    let took = drained.await.expect("drain");
    assert!(
        took < Duration::from_secs(20),
        "drain waited for the timeout although the client left"
    );
    // A draining instance takes no new feeds.
    let r = call("GET", &format!("{}/ws", s.notify), Some(&token), None, None).await;
    assert_eq!(r.status, 503);
}
