//! The domain model every shop service shares: items, ids, amounts, the catalog, the
//! events (one Rust type per CloudEvents `type`) and the topics they travel on, and the
//! request/reply messages of the payment responder.
//!
//! Every event's `subject()` is its order id, so the bus keeps one order's events in
//! order within a consumer group while different orders flow in parallel.
//!
//! | topic | events |
//! | --- | --- |
//! | [`ORDERS`] | [`OrderCreated`], [`OrderCompleted`], [`OrderFailed`] |
//! | [`PAYMENTS`] | [`PaymentCompleted`], [`PaymentFailed`], [`PaymentRefunded`] |
//! | [`INVENTORY`] | [`InventoryReserved`], [`OutOfStock`], [`InventoryReleased`] |
//! | [`SHIPPING`] | [`ShipmentCreated`], [`LabelGenerated`], [`ShipmentCancelled`] |
//! | [`PAYMENT_REQUESTS`] (transient, request/reply) | [`ChargeRequest`] → [`ChargeReply`], [`RefundRequest`] → [`RefundReply`] |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use switchyard::Event;

/// An order's id (1 to 128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`:
/// it appears in URLs and file names; see [`validate_id`]).
pub type OrderId = String;

/// A customer's id (same alphabet as [`OrderId`]). Prefixes mean something to the
/// payment service: `vip-*` customers have a high limit, `broke-*` customers none.
pub type CustomerId = String;

/// Money, in cents (no floating point anywhere near money).
pub type Cents = u64;

/// The largest quantity of one SKU an order line may ask for.
pub const MAX_QTY: u32 = 1_000_000;

/// The most lines one order may have.
pub const MAX_ITEMS: usize = 100;

/// One order line: `qty` units of `sku`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Item {
    /// The catalog SKU (e.g. `sku-001`).
    pub sku: String,
    /// Units, 1 to [`MAX_QTY`].
    pub qty: u32,
}

impl Item {
    /// `qty` units of `sku`.
    pub fn new(sku: impl Into<String>, qty: u32) -> Self {
        Item {
            sku: sku.into(),
            qty,
        }
    }
}

/// Why an id or an item list is not acceptable: the field and the reason, ready for a
/// 422 problem or an INVALID_ARGUMENT status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field `{field}`: {reason}")]
pub struct Invalid {
    /// The request field (`order_id`, `items[2].qty`, …).
    pub field: String,
    /// What is wrong with it, and what is allowed.
    pub reason: String,
}

impl Invalid {
    /// The field `field` is invalid because `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Checks an id (order, customer, tracking number, event type): 1 to 128 characters
/// of `A-Z a-z 0-9 . _ -`, not starting with `.`. Ids end up in URLs and file names,
/// so anything else is refused at the edge.
pub fn validate_id(field: &str, id: &str) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if id.len() > 128 {
        return Err(Invalid::new(field, "must be at most 128 characters"));
    }
    if id.starts_with('.') {
        return Err(Invalid::new(field, "must not start with `.`"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Invalid::new(
            field,
            format!("character {c:?} is not allowed (use A-Z a-z 0-9 . _ -)"),
        ));
    }
    Ok(())
}

/// Checks an order's lines (1 to [`MAX_ITEMS`], each with a well-formed SKU and a
/// quantity of 1 to [`MAX_QTY`]) and merges repeated SKUs into one quantity per SKU.
/// Whether the SKUs exist is the inventory's business.
pub fn normalize_items(items: &[Item]) -> Result<BTreeMap<String, u64>, Invalid> {
    if items.is_empty() {
        return Err(Invalid::new("items", "must list at least one item"));
    }
    if items.len() > MAX_ITEMS {
        return Err(Invalid::new(
            "items",
            format!("at most {MAX_ITEMS} lines per order"),
        ));
    }
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        validate_id(&format!("items[{i}].sku"), &it.sku)?;
        if it.qty == 0 || it.qty > MAX_QTY {
            return Err(Invalid::new(
                format!("items[{i}].qty"),
                format!("must be 1 to {MAX_QTY}, was {}", it.qty),
            ));
        }
        *out.entry(it.sku.clone()).or_default() += u64::from(it.qty);
    }
    Ok(out)
}

// ---------------------------------------------------------------- catalog

/// One product: its price and the stock the inventory starts with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// The SKU.
    pub sku: String,
    /// Unit price in cents.
    pub price_cents: Cents,
    /// Units in stock when the inventory is first seeded.
    pub initial_stock: u64,
}

/// The SKU of the one scarce product (stock [`RARE_STOCK`]): order it to reach
/// out-of-stock on purpose.
pub const RARE_SKU: &str = "sku-rare";

/// The initial stock of [`RARE_SKU`].
pub const RARE_STOCK: u64 = 5;

/// The products the shop sells: prices for the order service, initial stock for the
/// inventory. [`Catalog::standard`] is the seeded one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    products: BTreeMap<String, Product>,
}

impl Catalog {
    /// `sku-001` … `sku-020` (prices 500, 1 000, … 10 000 cents; 10 000 units each) and
    /// [`RARE_SKU`] (2 500 cents; [`RARE_STOCK`] units).
    pub fn standard() -> Self {
        let mut products: Vec<Product> = (1..=20u64)
            .map(|i| Product {
                sku: format!("sku-{i:03}"),
                price_cents: 500 * i,
                initial_stock: 10_000,
            })
            .collect();
        products.push(Product {
            sku: RARE_SKU.to_string(),
            price_cents: 2_500,
            initial_stock: RARE_STOCK,
        });
        Catalog::from_products(products)
    }

    /// A catalog of `products` (a later duplicate SKU replaces an earlier one).
    pub fn from_products(products: impl IntoIterator<Item = Product>) -> Self {
        Catalog {
            products: products.into_iter().map(|p| (p.sku.clone(), p)).collect(),
        }
    }

    /// The product `sku`, if sold.
    pub fn get(&self, sku: &str) -> Option<&Product> {
        self.products.get(sku)
    }

    /// Every product, by SKU.
    pub fn products(&self) -> impl Iterator<Item = &Product> {
        self.products.values()
    }

    /// The price of `items` in cents; `None` if a SKU is not sold (or the sum overflows).
    pub fn price(&self, items: &[Item]) -> Option<Cents> {
        items.iter().try_fold(0u64, |sum, it| {
            let p = self.get(&it.sku)?;
            sum.checked_add(p.price_cents.checked_mul(u64::from(it.qty))?)
        })
    }

    /// The units of every product's initial stock together (what the inventory's
    /// conservation invariant sums to).
    pub fn total_initial_units(&self) -> u64 {
        self.products.values().map(|p| p.initial_stock).sum()
    }
}

// ---------------------------------------------------------------- topics

/// Order lifecycle events.
pub const ORDERS: &str = "shop.orders";
/// Payment outcomes.
pub const PAYMENTS: &str = "shop.payments";
/// Stock reservations.
pub const INVENTORY: &str = "shop.inventory";
/// Shipments and labels.
pub const SHIPPING: &str = "shop.shipping";
/// The payment service's request/reply topic (transient channel; see
/// [`crate::services::payment::respond`]).
pub const PAYMENT_REQUESTS: &str = "shop.payment.requests";

/// Every durable event topic of the shop.
pub const TOPICS: [&str; 4] = [ORDERS, PAYMENTS, INVENTORY, SHIPPING];

// ---------------------------------------------------------------- events

macro_rules! order_event {
    ($(#[$doc:meta])* $name:ident = $ty:literal { $($(#[$fdoc:meta])* $field:ident : $fty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $fty,)*
        }

        impl Event for $name {
            const TYPE: &'static str = $ty;
            fn subject(&self) -> Option<String> {
                Some(self.order_id.clone())
            }
        }
    };
}

order_event! {
    /// An order was placed (the start of every flow).
    OrderCreated = "shop.order.created.v1" {
        /// The order.
        order_id: OrderId,
        /// Who placed it.
        customer: CustomerId,
        /// What was ordered.
        items: Vec<Item>,
        /// What it costs.
        amount_cents: Cents,
        /// The token to charge (`tok_decline` always declines).
        payment_token: String,
    }
}

order_event! {
    /// The order's payment went through.
    PaymentCompleted = "shop.payment.completed.v1" {
        /// The order.
        order_id: OrderId,
        /// The payment service's charge id (needed to refund).
        charge_id: String,
        /// The amount charged.
        amount_cents: Cents,
        /// What was ordered, carried along (from `OrderCreated`) so that Inventory can
        /// reserve without having seen any other event first. Empty in events of older
        /// versions.
        #[serde(default)]
        items: Vec<Item>,
    }
}

order_event! {
    /// The order's payment was declined or failed.
    PaymentFailed = "shop.payment.failed.v1" {
        /// The order.
        order_id: OrderId,
        /// Why (the decline reason).
        reason: String,
    }
}

order_event! {
    /// A charge was refunded (a compensation).
    PaymentRefunded = "shop.payment.refunded.v1" {
        /// The order.
        order_id: OrderId,
        /// The refunded charge.
        charge_id: String,
        /// The amount refunded.
        amount_cents: Cents,
    }
}

order_event! {
    /// Every item of the order is reserved.
    InventoryReserved = "shop.inventory.reserved.v1" {
        /// The order.
        order_id: OrderId,
        /// What was reserved, carried along so that Shipping can ship without having
        /// seen any other event first. Empty in events of older versions.
        #[serde(default)]
        items: Vec<Item>,
    }
}

order_event! {
    /// The order could not be reserved: one SKU is short (nothing was reserved).
    OutOfStock = "shop.inventory.out_of_stock.v1" {
        /// The order.
        order_id: OrderId,
        /// The first SKU that is short.
        sku: String,
        /// Units the order asked for.
        requested: u64,
        /// Units available.
        available: u64,
    }
}

order_event! {
    /// The order's reservation was released (a compensation).
    InventoryReleased = "shop.inventory.released.v1" {
        /// The order.
        order_id: OrderId,
    }
}

order_event! {
    /// A shipment was created for the order.
    ShipmentCreated = "shop.shipping.shipment_created.v1" {
        /// The order.
        order_id: OrderId,
        /// The tracking number.
        tracking: String,
    }
}

order_event! {
    /// The shipment's label file was written.
    LabelGenerated = "shop.shipping.label_generated.v1" {
        /// The order.
        order_id: OrderId,
        /// The tracking number.
        tracking: String,
        /// The label file (under the data directory).
        path: String,
    }
}

order_event! {
    /// A shipment was cancelled before it left (the order failed after all): the goods
    /// go back on the shelf.
    ShipmentCancelled = "shop.shipping.shipment_cancelled.v1" {
        /// The order.
        order_id: OrderId,
        /// The cancelled shipment's tracking number.
        tracking: String,
    }
}

order_event! {
    /// The order went through: paid, reserved, shipped.
    OrderCompleted = "shop.order.completed.v1" {
        /// The order.
        order_id: OrderId,
    }
}

order_event! {
    /// The order failed (and whatever was done for it was compensated).
    OrderFailed = "shop.order.failed.v1" {
        /// The order.
        order_id: OrderId,
        /// Why.
        reason: String,
    }
}

// ---------------------------------------------------------------- payment request/reply

order_event! {
    /// Request: charge an order (answered with [`ChargeReply`]; a decline is a terminal
    /// error reply whose reason starts with `declined:`).
    ChargeRequest = "shop.payment.charge_request.v1" {
        /// The order.
        order_id: OrderId,
        /// The customer (decides the limit).
        customer: CustomerId,
        /// The amount.
        amount_cents: Cents,
        /// The token to charge.
        payment_token: String,
    }
}

order_event! {
    /// Reply to [`ChargeRequest`].
    ChargeReply = "shop.payment.charge_reply.v1" {
        /// The order.
        order_id: OrderId,
        /// The charge (the same for every request with the same idempotency key).
        charge_id: String,
        /// `succeeded`.
        status: String,
        /// The amount charged.
        amount_cents: Cents,
    }
}

order_event! {
    /// Request: refund a charge of an order (answered with [`RefundReply`]).
    RefundRequest = "shop.payment.refund_request.v1" {
        /// The order.
        order_id: OrderId,
        /// The charge to refund.
        charge_id: String,
    }
}

order_event! {
    /// Reply to [`RefundRequest`].
    RefundReply = "shop.payment.refund_reply.v1" {
        /// The order.
        order_id: OrderId,
        /// The refund (the same for every refund of the charge).
        refund_id: String,
        /// The amount refunded.
        amount_cents: Cents,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_is_seeded_as_documented() {
        let c = Catalog::standard();
        assert_eq!(c.products().count(), 21);
        assert_eq!(c.get("sku-001").map(|p| p.price_cents), Some(500));
        assert_eq!(c.get("sku-020").map(|p| p.price_cents), Some(10_000));
        assert_eq!(c.get(RARE_SKU).map(|p| p.initial_stock), Some(RARE_STOCK));
        assert_eq!(c.total_initial_units(), 20 * 10_000 + RARE_STOCK);
        assert_eq!(
            c.price(&[Item::new("sku-002", 3), Item::new("sku-001", 1)]),
            Some(3_500)
        );
        assert_eq!(c.price(&[Item::new("nope", 1)]), None);
    }

    #[test]
    fn ids_and_items_are_checked() {
        assert!(validate_id("order_id", "o-1.2_x").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert_eq!(
                validate_id("order_id", bad).unwrap_err().field,
                "order_id",
                "{bad:?}"
            );
        }
        let merged = normalize_items(&[Item::new("sku-001", 2), Item::new("sku-001", 3)]).unwrap();
        assert_eq!(merged.get("sku-001"), Some(&5));
        assert_eq!(normalize_items(&[]).unwrap_err().field, "items");
        assert_eq!(
            normalize_items(&[Item::new("sku-001", 1), Item::new("sku-002", 0)])
                .unwrap_err()
                .field,
            "items[1].qty"
        );
        assert_eq!(
            normalize_items(&[Item::new("sku-001", MAX_QTY + 1)])
                .unwrap_err()
                .field,
            "items[0].qty"
        );
    }

    #[test]
    fn events_are_keyed_by_order() {
        let env = switchyard::codec::encode(
            &OrderCompleted {
                order_id: "o-7".into(),
            },
            "/test",
        )
        .unwrap();
        assert_eq!(env.event_type, "shop.order.completed.v1");
        assert_eq!(env.subject.as_deref(), Some("o-7"));
    }
}
