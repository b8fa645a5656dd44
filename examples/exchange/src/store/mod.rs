//! The store every instance of every version shares: users, orders, trades and the
//! outbox of per-user events. One interface, two backends: SQLite (WAL) on one
//! machine and PostgreSQL in a cluster.
//!
//! Placements and cancellations run inside one transaction that holds the store's
//! single writer lock (SQLite's `BEGIN IMMEDIATE`, a PostgreSQL transaction-level
//! advisory lock), so matching is safe across processes and versions: no double
//! fill, no lost fill, and per-user event sequence numbers without gaps. One lock
//! for the whole exchange rather than one per market: an order touches the event
//! sequences of several users, and per-market locks would let two markets deadlock
//! on those rows.
//!
//! Why not sqlx: its SQLite driver links a different `libsqlite3-sys` than the
//! `rusqlite` the rest of the workspace uses, and Cargo allows only one.

mod postgres;
mod sqlite;

use crate::model::{Event, NewOrder, Order, Placed, Trade};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "unsupported database URL {0:?}: use sqlite:/path/to/file.db or postgres://user:password@host:port/db"
    )]
    BadUrl(String),
    #[error("already exists")]
    Conflict,
    #[error("not found")]
    NotFound,
    #[error("order {0} is no longer open")]
    NotOpen(i64),
    #[error("idempotency key already used for order {0} with different parameters")]
    IdempotencyMismatch(i64),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(String),
    #[error("store task failed: {0}")]
    Task(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: i64,
    pub username: String,
    pub password_hash: String,
    pub created_ms: i64,
}

#[derive(Clone)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

impl Store {
    /// Opens (and migrates) the store named by `url`: `sqlite:PATH` or
    /// `postgres://...`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            if path.is_empty() {
                return Err(StoreError::BadUrl(url.to_string()));
            }
            Ok(Store::Sqlite(sqlite::SqliteStore::open(path.into()).await?))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(postgres::PgStore::open(url).await?))
        } else {
            Err(StoreError::BadUrl(url.to_string()))
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    pub async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.create_user(username, password_hash).await,
            Store::Postgres(s) => s.create_user(username, password_hash).await,
        }
    }

    pub async fn user_by_name(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        match self {
            Store::Sqlite(s) => s.user_by_name(username).await,
            Store::Postgres(s) => s.user_by_name(username).await,
        }
    }

    pub async fn user_by_id(&self, id: i64) -> Result<Option<UserRow>, StoreError> {
        match self {
            Store::Sqlite(s) => s.user_by_id(id).await,
            Store::Postgres(s) => s.user_by_id(id).await,
        }
    }

    /// Places and matches an order, or answers an earlier placement with the same
    /// idempotency key.
    pub async fn place_order(&self, new: NewOrder) -> Result<Placed, StoreError> {
        match self {
            Store::Sqlite(s) => s.place_order(new).await,
            Store::Postgres(s) => s.place_order(new).await,
        }
    }

    pub async fn cancel_order(&self, user_id: i64, order_id: i64) -> Result<Order, StoreError> {
        match self {
            Store::Sqlite(s) => s.cancel_order(user_id, order_id).await,
            Store::Postgres(s) => s.cancel_order(user_id, order_id).await,
        }
    }

    pub async fn orders(&self, user_id: i64) -> Result<Vec<Order>, StoreError> {
        match self {
            Store::Sqlite(s) => s.orders(user_id).await,
            Store::Postgres(s) => s.orders(user_id).await,
        }
    }

    pub async fn order(&self, user_id: i64, order_id: i64) -> Result<Option<Order>, StoreError> {
        match self {
            Store::Sqlite(s) => s.order(user_id, order_id).await,
            Store::Postgres(s) => s.order(user_id, order_id).await,
        }
    }

    /// Trades in which `user_id` bought or sold.
    pub async fn trades(&self, user_id: i64) -> Result<Vec<Trade>, StoreError> {
        match self {
            Store::Sqlite(s) => s.trades(user_id).await,
            Store::Postgres(s) => s.trades(user_id).await,
        }
    }

    /// Open orders of a market, both sides, best price first: the public book.
    pub async fn book(&self, market: &str) -> Result<Vec<Order>, StoreError> {
        match self {
            Store::Sqlite(s) => s.book(market).await,
            Store::Postgres(s) => s.book(market).await,
        }
    }

    /// A user's events with a sequence number above `since`, oldest first.
    pub async fn events_since(
        &self,
        user_id: i64,
        since: i64,
        limit: i64,
    ) -> Result<Vec<Event>, StoreError> {
        match self {
            Store::Sqlite(s) => s.events_since(user_id, since, limit).await,
            Store::Postgres(s) => s.events_since(user_id, since, limit).await,
        }
    }

    /// The newest event's store-wide id: a cheap way for the notification service to
    /// learn that something, somewhere, happened.
    pub async fn last_event_id(&self) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.last_event_id().await,
            Store::Postgres(s) => s.last_event_id().await,
        }
    }
}

pub(crate) fn parse_side(s: &str) -> Result<crate::model::Side, StoreError> {
    crate::model::Side::parse(s).ok_or_else(|| StoreError::Corrupt(format!("side {s:?}")))
}

pub(crate) fn parse_status(s: &str) -> Result<crate::model::OrderStatus, StoreError> {
    crate::model::OrderStatus::parse(s).ok_or_else(|| StoreError::Corrupt(format!("status {s:?}")))
}
