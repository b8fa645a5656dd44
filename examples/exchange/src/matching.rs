//! Price-time priority matching, kept pure so that both stores run the same rules
//! and the rules can be tested without a database.

use crate::model::Side;

/// A resting order on the other side of the book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resting {
    pub order_id: i64,
    pub user_id: i64,
    pub price: i64,
    pub remaining: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub resting_order_id: i64,
    pub resting_user_id: i64,
    /// Trades happen at the resting (maker) order's price.
    pub price: i64,
    pub qty: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub fills: Vec<Fill>,
    pub remaining: i64,
}

/// Whether a resting order at `resting` crosses an incoming `side` order at `limit`.
pub fn crosses(side: Side, limit: i64, resting: i64) -> bool {
    match side {
        Side::Buy => resting <= limit,
        Side::Sell => resting >= limit,
    }
}

/// Sorts resting orders by priority: best price first, then oldest (lowest id).
pub fn prioritise(side_of_incoming: Side, book: &mut [Resting]) {
    match side_of_incoming {
        Side::Buy => book.sort_by_key(|r| (r.price, r.order_id)),
        Side::Sell => book.sort_by_key(|r| (std::cmp::Reverse(r.price), r.order_id)),
    }
}

/// Matches an incoming limit order against `book`, which must hold the other side's
/// open orders. The book is sorted here, so callers need not trust their query.
pub fn match_incoming(side: Side, limit: i64, qty: i64, book: &[Resting]) -> Matched {
    let mut book = book.to_vec();
    prioritise(side, &mut book);
    let mut remaining = qty;
    let mut fills = Vec::new();
    for resting in book {
        if remaining == 0 || !crosses(side, limit, resting.price) {
            break;
        }
        if resting.remaining <= 0 {
            continue;
        }
        let take = remaining.min(resting.remaining);
        remaining -= take;
        fills.push(Fill {
            resting_order_id: resting.order_id,
            resting_user_id: resting.user_id,
            price: resting.price,
            qty: take,
        });
    }
    Matched { fills, remaining }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(order_id: i64, price: i64, remaining: i64) -> Resting {
        Resting {
            order_id,
            user_id: order_id * 10,
            price,
            remaining,
        }
    }

    #[test]
    fn buy_takes_cheapest_asks_first_then_oldest() {
        let book = [r(3, 101, 5), r(1, 102, 5), r(2, 101, 5)];
        let m = match_incoming(Side::Buy, 102, 12, &book);
        let order: Vec<(i64, i64, i64)> = m
            .fills
            .iter()
            .map(|f| (f.resting_order_id, f.price, f.qty))
            .collect();
        assert_eq!(order, vec![(2, 101, 5), (3, 101, 5), (1, 102, 2)]);
        assert_eq!(m.remaining, 0);
    }

    #[test]
    fn sell_takes_highest_bids_and_stops_at_its_limit() {
        let book = [r(1, 99, 5), r(2, 100, 1), r(3, 98, 5)];
        let m = match_incoming(Side::Sell, 99, 10, &book);
        let order: Vec<(i64, i64)> = m
            .fills
            .iter()
            .map(|f| (f.resting_order_id, f.qty))
            .collect();
        assert_eq!(order, vec![(2, 1), (1, 5)]);
        assert_eq!(
            m.remaining, 4,
            "the 98 bid is below the limit and must not fill"
        );
    }

    #[test]
    fn no_cross_no_fill() {
        let m = match_incoming(Side::Buy, 90, 3, &[r(1, 91, 5)]);
        assert!(m.fills.is_empty());
        assert_eq!(m.remaining, 3);
    }

    #[test]
    fn filled_quantity_never_exceeds_either_side() {
        // Exhaustive over small books: conservation of quantity.
        for qty in 1..8 {
            for a in 0..4 {
                for b in 0..4 {
                    let book = [r(1, 100, a), r(2, 101, b)];
                    let m = match_incoming(Side::Buy, 101, qty, &book);
                    let filled: i64 = m.fills.iter().map(|f| f.qty).sum();
                    assert_eq!(filled + m.remaining, qty);
                    assert_eq!(filled, qty.min(a + b));
                    for f in &m.fills {
                        let resting = book.iter().find(|x| x.order_id == f.resting_order_id);
                        assert!(f.qty <= resting.map_or(0, |x| x.remaining));
                    }
                }
            }
        }
    }
}
