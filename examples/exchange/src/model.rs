//! What the services store and send: orders, trades and per-user events.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Buy,
    Sell,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Buy => "buy",
            Side::Sell => "sell",
        }
    }
    pub fn parse(s: &str) -> Option<Side> {
        match s {
            "buy" => Some(Side::Buy),
            "sell" => Some(Side::Sell),
            _ => None,
        }
    }
    pub fn opposite(self) -> Side {
        match self {
            Side::Buy => Side::Sell,
            Side::Sell => Side::Buy,
        }
    }
}

/// A partly filled order stays `Open` with `remaining < qty`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Open,
    Filled,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Open => "open",
            OrderStatus::Filled => "filled",
            OrderStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<OrderStatus> {
        match s {
            "open" => Some(OrderStatus::Open),
            "filled" => Some(OrderStatus::Filled),
            "cancelled" => Some(OrderStatus::Cancelled),
            _ => None,
        }
    }
}

/// A limit order as the trade service received it. Prices are integer ticks and
/// quantities integer lots: no floating point near money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub user_id: i64,
    pub market: String,
    pub side: Side,
    pub price: i64,
    pub qty: i64,
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub market: String,
    pub side: Side,
    pub price: i64,
    pub qty: i64,
    pub remaining: i64,
    pub status: OrderStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub idempotency_key: Option<String>,
    pub created_ms: i64,
}

impl Order {
    /// A retried request must ask for the same order; reusing a key for a different
    /// order is a client bug and is refused rather than silently answered.
    pub fn same_request(&self, new: &NewOrder) -> bool {
        self.user_id == new.user_id
            && self.market == new.market
            && self.side == new.side
            && self.price == new.price
            && self.qty == new.qty
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trade {
    pub id: i64,
    pub market: String,
    pub price: i64,
    pub qty: i64,
    pub buy_order_id: i64,
    pub sell_order_id: i64,
    pub buyer_id: i64,
    pub seller_id: i64,
    pub created_ms: i64,
}

/// The outcome of placing an order: the order as it stands after matching, and the
/// trades it made. `replayed` is true when an idempotency key matched an earlier
/// placement and nothing new happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Placed {
    pub order: Order,
    pub trades: Vec<Trade>,
    pub replayed: bool,
}

/// One entry of a user's feed. `seq` counts from 1 per user without gaps, so a client
/// that saw `seq` N asks for everything after N.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    #[serde(flatten)]
    pub body: serde_json::Value,
}

/// The events a placement or cancellation writes to the outbox, in the same
/// transaction as the orders and trades they describe.
pub fn order_event(order: &Order) -> serde_json::Value {
    serde_json::json!({
        "type": "order",
        "orderId": order.id,
        "market": order.market,
        "side": order.side,
        "price": order.price,
        "qty": order.qty,
        "remaining": order.remaining,
        "status": order.status,
    })
}

pub fn fill_event(trade: &Trade, order_id: i64, side: Side, taker: bool) -> serde_json::Value {
    serde_json::json!({
        "type": "fill",
        "tradeId": trade.id,
        "orderId": order_id,
        "market": trade.market,
        "side": side,
        "price": trade.price,
        "qty": trade.qty,
        "liquidity": if taker { "taker" } else { "maker" },
    })
}
