//! PostgreSQL: the store for a cluster, where instances run on several machines.

use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use super::{StoreError, UserRow, parse_side, parse_status};
use crate::matching::{Resting, match_incoming};
use crate::model::{
    Event, NewOrder, Order, OrderStatus, Placed, Side, Trade, fill_event, order_event,
};
use crate::now_ms;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users(
  id BIGSERIAL PRIMARY KEY, username TEXT NOT NULL UNIQUE,
  password_hash TEXT NOT NULL, created_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS orders(
  id BIGSERIAL PRIMARY KEY, user_id BIGINT NOT NULL, market TEXT NOT NULL,
  side TEXT NOT NULL, price BIGINT NOT NULL, qty BIGINT NOT NULL, remaining BIGINT NOT NULL,
  status TEXT NOT NULL, idempotency_key TEXT, created_ms BIGINT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS orders_idempotency ON orders(user_id, idempotency_key)
  WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS orders_book ON orders(market, side, status, price, id);
CREATE INDEX IF NOT EXISTS orders_user ON orders(user_id, id);
CREATE TABLE IF NOT EXISTS trades(
  id BIGSERIAL PRIMARY KEY, market TEXT NOT NULL, price BIGINT NOT NULL,
  qty BIGINT NOT NULL, buy_order_id BIGINT NOT NULL, sell_order_id BIGINT NOT NULL,
  buyer_id BIGINT NOT NULL, seller_id BIGINT NOT NULL, created_ms BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS trades_buyer ON trades(buyer_id, id);
CREATE INDEX IF NOT EXISTS trades_seller ON trades(seller_id, id);
CREATE TABLE IF NOT EXISTS events(
  id BIGSERIAL PRIMARY KEY, user_id BIGINT NOT NULL, seq BIGINT NOT NULL,
  payload TEXT NOT NULL, created_ms BIGINT NOT NULL, UNIQUE(user_id, seq));
CREATE TABLE IF NOT EXISTS user_seq(user_id BIGINT PRIMARY KEY, last_seq BIGINT NOT NULL);
";

/// Advisory lock keys: one serialises migrations, one serialises the exchange's writes.
const MIGRATION_LOCK: i64 = 0x6261_746f_6e00;
const WRITER_LOCK: i64 = 0x6261_746f_6e01;

const ORDER_COLS: &str =
    "id, user_id, market, side, price, qty, remaining, status, idempotency_key, created_ms";
const TRADE_COLS: &str =
    "id, market, price, qty, buy_order_id, sell_order_id, buyer_id, seller_id, created_ms";

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

fn pool_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Pool(e.to_string())
}

impl PgStore {
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let config: tokio_postgres::Config = url.parse()?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .build()
            .map_err(pool_err)?;
        let mut client = pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(SCHEMA).await?;
        tx.commit().await?;
        Ok(PgStore { pool })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    pub async fn create_user(&self, username: &str, hash: &str) -> Result<i64, StoreError> {
        let c = self.client().await?;
        match c
            .query_one(
                "INSERT INTO users(username, password_hash, created_ms) VALUES ($1, $2, $3) RETURNING id",
                &[&username, &hash, &now_ms()],
            )
            .await
        {
            Ok(row) => Ok(row.get(0)),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(StoreError::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn user_by_name(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT id, username, password_hash, created_ms FROM users WHERE username = $1",
                &[&username],
            )
            .await?;
        Ok(row.map(|r| user_row(&r)))
    }

    pub async fn user_by_id(&self, id: i64) -> Result<Option<UserRow>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT id, username, password_hash, created_ms FROM users WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(row.map(|r| user_row(&r)))
    }

    pub async fn place_order(&self, new: NewOrder) -> Result<Placed, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITER_LOCK])
            .await?;
        let placed = place(&tx, &new).await?;
        tx.commit().await?;
        Ok(placed)
    }

    pub async fn cancel_order(&self, user_id: i64, order_id: i64) -> Result<Order, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITER_LOCK])
            .await?;
        let mut order = order_by_id(&tx, user_id, order_id)
            .await?
            .ok_or(StoreError::NotFound)?;
        if order.status != OrderStatus::Open {
            return Err(StoreError::NotOpen(order.id));
        }
        order.status = OrderStatus::Cancelled;
        tx.execute(
            "UPDATE orders SET status = 'cancelled' WHERE id = $1",
            &[&order.id],
        )
        .await?;
        push_event(&tx, user_id, &order_event(&order)).await?;
        tx.commit().await?;
        Ok(order)
    }

    pub async fn orders(&self, user_id: i64) -> Result<Vec<Order>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {ORDER_COLS} FROM orders WHERE user_id = $1 ORDER BY id"),
                &[&user_id],
            )
            .await?;
        rows.iter().map(order_row).collect()
    }

    pub async fn order(&self, user_id: i64, order_id: i64) -> Result<Option<Order>, StoreError> {
        let c = self.client().await?;
        order_by_id(&c, user_id, order_id).await
    }

    pub async fn trades(&self, user_id: i64) -> Result<Vec<Trade>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {TRADE_COLS} FROM trades WHERE buyer_id = $1 OR seller_id = $1 ORDER BY id"),
                &[&user_id],
            )
            .await?;
        Ok(rows.iter().map(trade_row).collect())
    }

    pub async fn book(&self, market: &str) -> Result<Vec<Order>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {ORDER_COLS} FROM orders WHERE market = $1 AND status = 'open'
                     ORDER BY side, CASE side WHEN 'buy' THEN -price ELSE price END, id"
                ),
                &[&market],
            )
            .await?;
        rows.iter().map(order_row).collect()
    }

    pub async fn events_since(
        &self,
        user_id: i64,
        since: i64,
        limit: i64,
    ) -> Result<Vec<Event>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT seq, payload FROM events WHERE user_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&user_id, &since, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let payload: String = r.get(1);
                let body = serde_json::from_str(&payload)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(Event {
                    seq: r.get(0),
                    body,
                })
            })
            .collect()
    }

    pub async fn last_event_id(&self) -> Result<i64, StoreError> {
        let c = self.client().await?;
        Ok(
            c.query_one("SELECT COALESCE(MAX(id), 0)::BIGINT FROM events", &[])
                .await?
                .get(0),
        )
    }
}

fn user_row(r: &Row) -> UserRow {
    UserRow {
        id: r.get(0),
        username: r.get(1),
        password_hash: r.get(2),
        created_ms: r.get(3),
    }
}

fn order_row(r: &Row) -> Result<Order, StoreError> {
    Ok(Order {
        id: r.get(0),
        user_id: r.get(1),
        market: r.get(2),
        side: parse_side(r.get(3))?,
        price: r.get(4),
        qty: r.get(5),
        remaining: r.get(6),
        status: parse_status(r.get(7))?,
        idempotency_key: r.get(8),
        created_ms: r.get(9),
    })
}

fn trade_row(r: &Row) -> Trade {
    Trade {
        id: r.get(0),
        market: r.get(1),
        price: r.get(2),
        qty: r.get(3),
        buy_order_id: r.get(4),
        sell_order_id: r.get(5),
        buyer_id: r.get(6),
        seller_id: r.get(7),
        created_ms: r.get(8),
    }
}

async fn order_by_id(
    c: &impl GenericClient,
    user_id: i64,
    order_id: i64,
) -> Result<Option<Order>, StoreError> {
    let row = c
        .query_opt(
            &format!("SELECT {ORDER_COLS} FROM orders WHERE id = $1 AND user_id = $2"),
            &[&order_id, &user_id],
        )
        .await?;
    row.as_ref().map(order_row).transpose()
}

async fn push_event(
    c: &impl GenericClient,
    user_id: i64,
    body: &serde_json::Value,
) -> Result<(), StoreError> {
    let seq: i64 = c
        .query_one(
            "INSERT INTO user_seq(user_id, last_seq) VALUES ($1, 1)
             ON CONFLICT(user_id) DO UPDATE SET last_seq = user_seq.last_seq + 1 RETURNING last_seq",
            &[&user_id],
        )
        .await?
        .get(0);
    c.execute(
        "INSERT INTO events(user_id, seq, payload, created_ms) VALUES ($1, $2, $3, $4)",
        &[&user_id, &seq, &body.to_string(), &now_ms()],
    )
    .await?;
    Ok(())
}

async fn place(tx: &impl GenericClient, new: &NewOrder) -> Result<Placed, StoreError> {
    if let Some(key) = &new.idempotency_key {
        let existing = tx
            .query_opt(
                &format!(
                    "SELECT {ORDER_COLS} FROM orders WHERE user_id = $1 AND idempotency_key = $2"
                ),
                &[&new.user_id, key],
            )
            .await?;
        if let Some(row) = existing {
            let order = order_row(&row)?;
            if !order.same_request(new) {
                return Err(StoreError::IdempotencyMismatch(order.id));
            }
            let trades = tx
                .query(
                    &format!(
                        "SELECT {TRADE_COLS} FROM trades WHERE buy_order_id = $1 OR sell_order_id = $1 ORDER BY id"
                    ),
                    &[&order.id],
                )
                .await?
                .iter()
                .map(trade_row)
                .collect();
            return Ok(Placed {
                order,
                trades,
                replayed: true,
            });
        }
    }
    let now = now_ms();
    let id: i64 = tx
        .query_one(
            "INSERT INTO orders(user_id, market, side, price, qty, remaining, status, idempotency_key, created_ms)
             VALUES ($1, $2, $3, $4, $5, $5, 'open', $6, $7) RETURNING id",
            &[&new.user_id, &new.market, &new.side.as_str(), &new.price, &new.qty, &new.idempotency_key, &now],
        )
        .await?
        .get(0);
    let cmp = match new.side {
        Side::Buy => "<=",
        Side::Sell => ">=",
    };
    let book: Vec<Resting> = tx
        .query(
            &format!(
                "SELECT id, user_id, price, remaining FROM orders
                 WHERE market = $1 AND side = $2 AND status = 'open' AND price {cmp} $3"
            ),
            &[&new.market, &new.side.opposite().as_str(), &new.price],
        )
        .await?
        .iter()
        .map(|r| Resting {
            order_id: r.get(0),
            user_id: r.get(1),
            price: r.get(2),
            remaining: r.get(3),
        })
        .collect();
    let matched = match_incoming(new.side, new.price, new.qty, &book);
    let mut trades = Vec::with_capacity(matched.fills.len());
    for fill in &matched.fills {
        tx.execute(
            "UPDATE orders SET remaining = remaining - $1,
               status = CASE WHEN remaining - $1 = 0 THEN 'filled' ELSE status END WHERE id = $2",
            &[&fill.qty, &fill.resting_order_id],
        )
        .await?;
        let (buy_order_id, sell_order_id, buyer_id, seller_id) = match new.side {
            Side::Buy => (id, fill.resting_order_id, new.user_id, fill.resting_user_id),
            Side::Sell => (fill.resting_order_id, id, fill.resting_user_id, new.user_id),
        };
        let trade_id: i64 = tx
            .query_one(
                "INSERT INTO trades(market, price, qty, buy_order_id, sell_order_id, buyer_id, seller_id, created_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                &[&new.market, &fill.price, &fill.qty, &buy_order_id, &sell_order_id, &buyer_id, &seller_id, &now],
            )
            .await?
            .get(0);
        let trade = Trade {
            id: trade_id,
            market: new.market.clone(),
            price: fill.price,
            qty: fill.qty,
            buy_order_id,
            sell_order_id,
            buyer_id,
            seller_id,
            created_ms: now,
        };
        let maker = order_by_id(tx, fill.resting_user_id, fill.resting_order_id)
            .await?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("resting order {} vanished", fill.resting_order_id))
            })?;
        push_event(
            tx,
            maker.user_id,
            &fill_event(&trade, maker.id, maker.side, false),
        )
        .await?;
        push_event(tx, maker.user_id, &order_event(&maker)).await?;
        push_event(tx, new.user_id, &fill_event(&trade, id, new.side, true)).await?;
        trades.push(trade);
    }
    let status = if matched.remaining == 0 {
        "filled"
    } else {
        "open"
    };
    tx.execute(
        "UPDATE orders SET remaining = $1, status = $2 WHERE id = $3",
        &[&matched.remaining, &status, &id],
    )
    .await?;
    let order = order_by_id(tx, new.user_id, id)
        .await?
        .ok_or(StoreError::NotFound)?;
    push_event(tx, new.user_id, &order_event(&order)).await?;
    Ok(Placed {
        order,
        trades,
        replayed: false,
    })
}
