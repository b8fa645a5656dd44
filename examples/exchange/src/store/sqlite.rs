//! SQLite in WAL mode: the embedded default, shared by processes on one machine.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};

use super::{StoreError, UserRow, parse_side, parse_status};
use crate::matching::{Resting, match_incoming};
use crate::model::{
    Event, NewOrder, Order, OrderStatus, Placed, Side, Trade, fill_event, order_event,
};
use crate::now_ms;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users(
  id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT NOT NULL UNIQUE,
  password_hash TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS orders(
  id INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL, market TEXT NOT NULL,
  side TEXT NOT NULL, price INTEGER NOT NULL, qty INTEGER NOT NULL, remaining INTEGER NOT NULL,
  status TEXT NOT NULL, idempotency_key TEXT, created_ms INTEGER NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS orders_idempotency ON orders(user_id, idempotency_key)
  WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS orders_book ON orders(market, side, status, price, id);
CREATE INDEX IF NOT EXISTS orders_user ON orders(user_id, id);
CREATE TABLE IF NOT EXISTS trades(
  id INTEGER PRIMARY KEY AUTOINCREMENT, market TEXT NOT NULL, price INTEGER NOT NULL,
  qty INTEGER NOT NULL, buy_order_id INTEGER NOT NULL, sell_order_id INTEGER NOT NULL,
  buyer_id INTEGER NOT NULL, seller_id INTEGER NOT NULL, created_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS trades_buyer ON trades(buyer_id, id);
CREATE INDEX IF NOT EXISTS trades_seller ON trades(seller_id, id);
CREATE TABLE IF NOT EXISTS events(
  id INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL, seq INTEGER NOT NULL,
  payload TEXT NOT NULL, created_ms INTEGER NOT NULL, UNIQUE(user_id, seq));
CREATE TABLE IF NOT EXISTS user_seq(user_id INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL);
";

const ORDER_COLS: &str =
    "id, user_id, market, side, price, qty, remaining, status, idempotency_key, created_ms";
const TRADE_COLS: &str =
    "id, market, price, qty, buy_order_id, sell_order_id, buyer_id, seller_id, created_ms";

/// One connection per process behind a mutex, used from blocking threads; writers in
/// different processes queue on SQLite's own lock (`busy_timeout`).
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub async fn open(path: PathBuf) -> Result<SqliteStore, StoreError> {
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, StoreError> {
            let conn = Connection::open(&path)?;
            conn.busy_timeout(std::time::Duration::from_secs(30))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            let mut conn = conn;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(SCHEMA)?;
            tx.commit()?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Task("store lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    pub async fn create_user(&self, username: &str, hash: &str) -> Result<i64, StoreError> {
        let (username, hash) = (username.to_string(), hash.to_string());
        self.with(move |c| {
            match c.execute(
                "INSERT INTO users(username, password_hash, created_ms) VALUES (?1, ?2, ?3)",
                params![username, hash, now_ms()],
            ) {
                Ok(_) => Ok(c.last_insert_rowid()),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::Conflict)
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    pub async fn user_by_name(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        let username = username.to_string();
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT id, username, password_hash, created_ms FROM users WHERE username = ?1",
                [username],
                user_row,
            )
            .optional()?)
        })
        .await
    }

    pub async fn user_by_id(&self, id: i64) -> Result<Option<UserRow>, StoreError> {
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT id, username, password_hash, created_ms FROM users WHERE id = ?1",
                [id],
                user_row,
            )
            .optional()?)
        })
        .await
    }

    pub async fn place_order(&self, new: NewOrder) -> Result<Placed, StoreError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let placed = place(&tx, &new)?;
            tx.commit()?;
            Ok(placed)
        })
        .await
    }

    pub async fn cancel_order(&self, user_id: i64, order_id: i64) -> Result<Order, StoreError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut order = order_by_id(&tx, user_id, order_id)?.ok_or(StoreError::NotFound)?;
            if order.status != OrderStatus::Open {
                return Err(StoreError::NotOpen(order.id));
            }
            order.status = OrderStatus::Cancelled;
            tx.execute(
                "UPDATE orders SET status = 'cancelled' WHERE id = ?1",
                [order.id],
            )?;
            push_event(&tx, user_id, &order_event(&order))?;
            tx.commit()?;
            Ok(order)
        })
        .await
    }

    pub async fn orders(&self, user_id: i64) -> Result<Vec<Order>, StoreError> {
        self.with(move |c| {
            let mut st = c.prepare(&format!(
                "SELECT {ORDER_COLS} FROM orders WHERE user_id = ?1 ORDER BY id"
            ))?;
            let rows = st.query_map([user_id], order_row)?;
            collect_orders(rows)
        })
        .await
    }

    pub async fn order(&self, user_id: i64, order_id: i64) -> Result<Option<Order>, StoreError> {
        self.with(move |c| order_by_id(c, user_id, order_id)).await
    }

    pub async fn trades(&self, user_id: i64) -> Result<Vec<Trade>, StoreError> {
        self.with(move |c| {
            let mut st = c.prepare(&format!(
                "SELECT {TRADE_COLS} FROM trades WHERE buyer_id = ?1 OR seller_id = ?1 ORDER BY id"
            ))?;
            let rows = st.query_map([user_id], trade_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn book(&self, market: &str) -> Result<Vec<Order>, StoreError> {
        let market = market.to_string();
        self.with(move |c| {
            let mut st = c.prepare(&format!(
                "SELECT {ORDER_COLS} FROM orders WHERE market = ?1 AND status = 'open'
                 ORDER BY side, CASE side WHEN 'buy' THEN -price ELSE price END, id"
            ))?;
            let rows = st.query_map([market], order_row)?;
            collect_orders(rows)
        })
        .await
    }

    pub async fn events_since(
        &self,
        user_id: i64,
        since: i64,
        limit: i64,
    ) -> Result<Vec<Event>, StoreError> {
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT seq, payload FROM events WHERE user_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = st.query_map(params![user_id, since, limit], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, payload) = row?;
                let body = serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                out.push(Event { seq, body });
            }
            Ok(out)
        })
        .await
    }

    pub async fn last_event_id(&self) -> Result<i64, StoreError> {
        self.with(|c| Ok(c.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?))
            .await
    }
}

fn collect_orders(
    rows: impl Iterator<Item = rusqlite::Result<Result<Order, StoreError>>>,
) -> Result<Vec<Order>, StoreError> {
    rows.map(|r| r.map_err(StoreError::from).and_then(|o| o))
        .collect()
}

fn user_row(r: &Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        id: r.get(0)?,
        username: r.get(1)?,
        password_hash: r.get(2)?,
        created_ms: r.get(3)?,
    })
}

/// Rows map to `Result<Order>` so that a corrupt side or status is an error, not a panic.
fn order_row(r: &Row<'_>) -> rusqlite::Result<Result<Order, StoreError>> {
    let side: String = r.get(3)?;
    let status: String = r.get(7)?;
    let (side, status) = match (parse_side(&side), parse_status(&status)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
    };
    Ok(Ok(Order {
        id: r.get(0)?,
        user_id: r.get(1)?,
        market: r.get(2)?,
        side,
        price: r.get(4)?,
        qty: r.get(5)?,
        remaining: r.get(6)?,
        status,
        idempotency_key: r.get(8)?,
        created_ms: r.get(9)?,
    }))
}

fn trade_row(r: &Row<'_>) -> rusqlite::Result<Trade> {
    Ok(Trade {
        id: r.get(0)?,
        market: r.get(1)?,
        price: r.get(2)?,
        qty: r.get(3)?,
        buy_order_id: r.get(4)?,
        sell_order_id: r.get(5)?,
        buyer_id: r.get(6)?,
        seller_id: r.get(7)?,
        created_ms: r.get(8)?,
    })
}

fn order_by_id(c: &Connection, user_id: i64, order_id: i64) -> Result<Option<Order>, StoreError> {
    c.query_row(
        &format!("SELECT {ORDER_COLS} FROM orders WHERE id = ?1 AND user_id = ?2"),
        [order_id, user_id],
        order_row,
    )
    .optional()?
    .transpose()
}

fn push_event(
    tx: &Transaction<'_>,
    user_id: i64,
    body: &serde_json::Value,
) -> Result<(), StoreError> {
    let seq: i64 = tx.query_row(
        "INSERT INTO user_seq(user_id, last_seq) VALUES (?1, 1)
         ON CONFLICT(user_id) DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq",
        [user_id],
        |r| r.get(0),
    )?;
    tx.execute(
        "INSERT INTO events(user_id, seq, payload, created_ms) VALUES (?1, ?2, ?3, ?4)",
        params![user_id, seq, body.to_string(), now_ms()],
    )?;
    Ok(())
}

fn place(tx: &Transaction<'_>, new: &NewOrder) -> Result<Placed, StoreError> {
    if let Some(key) = &new.idempotency_key {
        let existing = tx
            .query_row(
                &format!(
                    "SELECT {ORDER_COLS} FROM orders WHERE user_id = ?1 AND idempotency_key = ?2"
                ),
                params![new.user_id, key],
                order_row,
            )
            .optional()?
            .transpose()?;
        if let Some(order) = existing {
            if !order.same_request(new) {
                return Err(StoreError::IdempotencyMismatch(order.id));
            }
            let mut st = tx.prepare(&format!(
                "SELECT {TRADE_COLS} FROM trades WHERE buy_order_id = ?1 OR sell_order_id = ?1 ORDER BY id"
            ))?;
            let trades = st
                .query_map([order.id], trade_row)?
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Placed {
                order,
                trades,
                replayed: true,
            });
        }
    }
    let now = now_ms();
    tx.execute(
        "INSERT INTO orders(user_id, market, side, price, qty, remaining, status, idempotency_key, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, 'open', ?6, ?7)",
        params![new.user_id, new.market, new.side.as_str(), new.price, new.qty, new.idempotency_key, now],
    )?;
    let id = tx.last_insert_rowid();
    let cmp = match new.side {
        Side::Buy => "<=",
        Side::Sell => ">=",
    };
    let book = {
        let mut st = tx.prepare(&format!(
            "SELECT id, user_id, price, remaining FROM orders
             WHERE market = ?1 AND side = ?2 AND status = 'open' AND price {cmp} ?3"
        ))?;
        st.query_map(
            params![new.market, new.side.opposite().as_str(), new.price],
            |r| {
                Ok(Resting {
                    order_id: r.get(0)?,
                    user_id: r.get(1)?,
                    price: r.get(2)?,
                    remaining: r.get(3)?,
                })
            },
        )?
        .collect::<Result<Vec<_>, _>>()?
    };
    let matched = match_incoming(new.side, new.price, new.qty, &book);
    let mut trades = Vec::with_capacity(matched.fills.len());
    for fill in &matched.fills {
        tx.execute(
            "UPDATE orders SET remaining = remaining - ?1,
               status = CASE WHEN remaining - ?1 = 0 THEN 'filled' ELSE status END WHERE id = ?2",
            params![fill.qty, fill.resting_order_id],
        )?;
        let (buy_order_id, sell_order_id, buyer_id, seller_id) = match new.side {
            Side::Buy => (id, fill.resting_order_id, new.user_id, fill.resting_user_id),
            Side::Sell => (fill.resting_order_id, id, fill.resting_user_id, new.user_id),
        };
        tx.execute(
            "INSERT INTO trades(market, price, qty, buy_order_id, sell_order_id, buyer_id, seller_id, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![new.market, fill.price, fill.qty, buy_order_id, sell_order_id, buyer_id, seller_id, now],
        )?;
        let trade = Trade {
            id: tx.last_insert_rowid(),
            market: new.market.clone(),
            price: fill.price,
            qty: fill.qty,
            buy_order_id,
            sell_order_id,
            buyer_id,
            seller_id,
            created_ms: now,
        };
        let maker =
            order_by_id(tx, fill.resting_user_id, fill.resting_order_id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("resting order {} vanished", fill.resting_order_id))
            })?;
        push_event(
            tx,
            maker.user_id,
            &fill_event(&trade, maker.id, maker.side, false),
        )?;
        push_event(tx, maker.user_id, &order_event(&maker))?;
        push_event(tx, new.user_id, &fill_event(&trade, id, new.side, true))?;
        trades.push(trade);
    }
    let status = if matched.remaining == 0 {
        "filled"
    } else {
        "open"
    };
    tx.execute(
        "UPDATE orders SET remaining = ?1, status = ?2 WHERE id = ?3",
        params![matched.remaining, status, id],
    )?;
    let order = order_by_id(tx, new.user_id, id)?.ok_or(StoreError::NotFound)?;
    push_event(tx, new.user_id, &order_event(&order))?;
    Ok(Placed {
        order,
        trades,
        replayed: false,
    })
}
