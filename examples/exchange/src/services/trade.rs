//! The trade service: limit orders with idempotency keys, matched by price-time
//! priority in the shared store, with an outbox of per-user events.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::auth::Tokens;
use crate::model::{NewOrder, Side};
use crate::service::{ApiError, authenticate, json, parse_json};
use crate::store::{Store, StoreError};

pub struct TradeState {
    pub store: Store,
    pub tokens: Tokens,
    pub markets: Vec<String>,
    pub metrics: TradeMetrics,
}

#[derive(Clone, Default)]
pub struct TradeMetrics {
    pub orders: Counter,
    pub trades: Counter,
    pub replays: Counter,
}

impl TradeMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "exchange_orders_placed",
            "Orders accepted (not counting replays)",
            self.orders.clone(),
        );
        registry.register(
            "exchange_trades",
            "Trades made by matching",
            self.trades.clone(),
        );
        registry.register(
            "exchange_idempotent_replays",
            "Placements answered from an earlier request with the same Idempotency-Key",
            self.replays.clone(),
        );
    }
}

pub fn router(state: Arc<TradeState>) -> Router {
    Router::new()
        .route("/orders", get(list_orders).post(place))
        .route("/orders/{id}", get(get_order).delete(cancel))
        .route("/trades", get(list_trades))
        .route("/book/{market}", get(book))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderRequest {
    market: String,
    side: Side,
    price: i64,
    qty: i64,
}

const MAX_PRICE: i64 = 1_000_000_000_000;
const MAX_QTY: i64 = 1_000_000_000;

async fn place(
    State(st): State<Arc<TradeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let claims = authenticate(&headers, &st.tokens)?;
    let req: OrderRequest = parse_json(&body)?;
    if !st.markets.contains(&req.market) {
        return Err(ApiError::field(
            "market",
            format!("unknown market; one of {}", st.markets.join(", ")),
        ));
    }
    if !(1..=MAX_PRICE).contains(&req.price) {
        return Err(ApiError::field(
            "price",
            format!("must be an integer number of ticks from 1 to {MAX_PRICE}"),
        ));
    }
    if !(1..=MAX_QTY).contains(&req.qty) {
        return Err(ApiError::field(
            "qty",
            format!("must be an integer number of lots from 1 to {MAX_QTY}"),
        ));
    }
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= 255);
            Some(key.ok_or_else(|| {
                ApiError::field(
                    "Idempotency-Key",
                    "must be 1 to 255 visible ASCII characters",
                )
            })?)
        }
    };
    let new = NewOrder {
        user_id: claims.sub,
        market: req.market,
        side: req.side,
        price: req.price,
        qty: req.qty,
        idempotency_key: key.map(str::to_string),
    };
    match st.store.place_order(new).await {
        Ok(placed) => {
            if placed.replayed {
                st.metrics.replays.inc();
                let mut r = json(StatusCode::OK, &placed);
                r.headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                Ok(r)
            } else {
                st.metrics.orders.inc();
                st.metrics.trades.inc_by(placed.trades.len() as u64);
                tracing::debug!(
                    order_id = placed.order.id,
                    fills = placed.trades.len(),
                    "placed"
                );
                Ok(json(StatusCode::CREATED, &placed))
            }
        }
        Err(StoreError::IdempotencyMismatch(id)) => Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "idempotency_key_reused",
            message: format!(
                "Idempotency-Key was already used for order {id} with different parameters"
            ),
            field: Some("Idempotency-Key".into()),
        }),
        Err(e) => Err(ApiError::internal(e)),
    }
}

fn order_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::field("id", "must be a positive integer"))
}

async fn get_order(
    State(st): State<Arc<TradeState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let claims = authenticate(&headers, &st.tokens)?;
    let id = order_id(&id)?;
    match st
        .store
        .order(claims.sub, id)
        .await
        .map_err(ApiError::internal)?
    {
        Some(order) => Ok(json(StatusCode::OK, order)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no order {id} of yours"),
        )),
    }
}

async fn cancel(
    State(st): State<Arc<TradeState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let claims = authenticate(&headers, &st.tokens)?;
    let id = order_id(&id)?;
    match st.store.cancel_order(claims.sub, id).await {
        Ok(order) => Ok(json(StatusCode::OK, order)),
        Err(StoreError::NotFound) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no order {id} of yours"),
        )),
        Err(StoreError::NotOpen(id)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_open",
            format!("order {id} is already filled or cancelled"),
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn list_orders(
    State(st): State<Arc<TradeState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let claims = authenticate(&headers, &st.tokens)?;
    let orders = st
        .store
        .orders(claims.sub)
        .await
        .map_err(ApiError::internal)?;
    Ok(json(StatusCode::OK, orders))
}

async fn list_trades(
    State(st): State<Arc<TradeState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let claims = authenticate(&headers, &st.tokens)?;
    let trades = st
        .store
        .trades(claims.sub)
        .await
        .map_err(ApiError::internal)?;
    Ok(json(StatusCode::OK, trades))
}

async fn book(
    State(st): State<Arc<TradeState>>,
    Path(market): Path<String>,
) -> Result<Response, ApiError> {
    if !st.markets.contains(&market) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("unknown market {market:?}"),
        ));
    }
    let orders = st.store.book(&market).await.map_err(ApiError::internal)?;
    let level = |side: Side| -> Vec<serde_json::Value> {
        orders
            .iter()
            .filter(|o| o.side == side)
            .map(|o| serde_json::json!({"price": o.price, "qty": o.remaining}))
            .collect()
    };
    Ok(json(
        StatusCode::OK,
        serde_json::json!({"market": market, "bids": level(Side::Buy), "asks": level(Side::Sell)}),
    ))
}
