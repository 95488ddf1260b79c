//! The gRPC form of the Order API: `shop.order.v1.Orders` (`proto/order.proto`) over an
//! [`OrderDesk`], with the same semantics as the REST API: INVALID_ARGUMENT naming the
//! field (`x-switchyard-field`), ALREADY_EXISTS for an existing order id, NOT_FOUND for
//! an unknown order, UNAVAILABLE when the pattern is not running or a store is down.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use super::{
    ApiError, BODY_LIMIT, DEFAULT_LIMIT, MAX_LIMIT, MAX_WAIT, SERVICE, list_orders, settle,
};
use crate::faults::{FaultLayer, Faults};
use crate::model::{Invalid, Item, validate_id};
use crate::order::{NewOrder, Order, OrderDesk, OrderStatus, Pattern, TimelineEntry};
use crate::services::ServeError;

/// The generated gRPC code of `proto/order.proto` (messages, client, server).
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
#[rustfmt::skip]
#[path = "generated/shop.order.v1.rs"]
pub mod proto;

/// The proto status of `s`.
pub fn status_to_proto(s: OrderStatus) -> proto::OrderStatus {
    match s {
        OrderStatus::Accepted => proto::OrderStatus::Accepted,
        OrderStatus::Completed => proto::OrderStatus::Completed,
        OrderStatus::Failed => proto::OrderStatus::Failed,
    }
}

/// The order status of a proto status value (`None`: unspecified); an unknown value is
/// INVALID_ARGUMENT naming `field`.
pub fn status_from_proto(v: i32, field: &str) -> Result<Option<OrderStatus>, Invalid> {
    match proto::OrderStatus::try_from(v) {
        Ok(proto::OrderStatus::Unspecified) => Ok(None),
        Ok(proto::OrderStatus::Accepted) => Ok(Some(OrderStatus::Accepted)),
        Ok(proto::OrderStatus::Completed) => Ok(Some(OrderStatus::Completed)),
        Ok(proto::OrderStatus::Failed) => Ok(Some(OrderStatus::Failed)),
        Err(_) => Err(Invalid::new(
            field,
            format!("unknown status {v}; use ORDER_STATUS_ACCEPTED, _COMPLETED or _FAILED"),
        )),
    }
}

fn entry_to_proto(e: &TimelineEntry) -> proto::TimelineEntry {
    proto::TimelineEntry {
        at: e.at.to_string(),
        at_unix_micros: e.at.unix_micros(),
        service: e.service.clone(),
        what: e.what.clone(),
        detail: e.detail.clone(),
    }
}

/// The proto form of an order line.
pub fn item_to_proto(item: &crate::model::Item) -> proto::Item {
    proto::Item {
        sku: item.sku.clone(),
        qty: item.qty,
    }
}

/// The proto form of `order` (the payment token left out).
pub fn order_to_proto(order: &Order) -> proto::Order {
    proto::Order {
        id: order.id.clone(),
        customer: order.customer.clone(),
        items: order.items.iter().map(item_to_proto).collect(),
        amount_cents: order.amount_cents,
        pattern: order.pattern.as_str().to_string(),
        status: status_to_proto(order.status) as i32,
        reason: order.reason.clone(),
        history: order.history.iter().map(entry_to_proto).collect(),
        created_at: order.created_at.to_string(),
        updated_at: order.updated_at.to_string(),
    }
}

/// The [`NewOrder`] of a `PlaceOrderRequest`; an unknown pattern is invalid `pattern`.
pub fn new_order_from_proto(m: proto::PlaceOrderRequest) -> Result<NewOrder, Invalid> {
    let pattern = Pattern::from_str(&m.pattern)?;
    Ok(NewOrder {
        order_id: m.order_id,
        customer: m.customer,
        items: m
            .items
            .into_iter()
            .map(|i| Item::new(i.sku, i.qty))
            .collect(),
        payment_token: m.payment_token,
        pattern,
    })
}

fn wait_of(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms).min(MAX_WAIT))
}

/// The gRPC implementation of `shop.order.v1.Orders` over an [`OrderDesk`].
#[derive(Debug, Clone)]
pub struct OrdersService {
    desk: OrderDesk,
}

impl OrdersService {
    /// The service over `desk`.
    pub fn new(desk: OrderDesk) -> Self {
        OrdersService { desk }
    }
}

#[tonic::async_trait]
impl proto::orders_server::Orders for OrdersService {
    async fn place_order(
        &self,
        request: Request<proto::PlaceOrderRequest>,
    ) -> Result<Response<proto::PlaceOrderReply>, Status> {
        let m = request.into_inner();
        let wait = wait_of(m.wait_ms);
        let run = async {
            let req = new_order_from_proto(m)?;
            let order = self.desk.place(&req).await?;
            tracing::info!(order_id = %order.id, pattern = %order.pattern, status = %order.status, "order placed (gRPC)");
            settle(&self.desk, order, wait).await
        };
        let order = run.await.map_err(|e: ApiError| e.to_status())?;
        Ok(Response::new(proto::PlaceOrderReply {
            terminal: order.status.is_terminal(),
            order: Some(order_to_proto(&order)),
        }))
    }

    async fn get_order(
        &self,
        request: Request<proto::GetOrderRequest>,
    ) -> Result<Response<proto::Order>, Status> {
        let m = request.into_inner();
        let run = async {
            validate_id("order_id", &m.order_id)?;
            let order = self
                .desk
                .book()
                .get(&m.order_id)
                .await?
                .ok_or_else(|| ApiError::NotFound(m.order_id.clone()))?;
            settle(&self.desk, order, wait_of(m.wait_ms)).await
        };
        let order = run.await.map_err(|e: ApiError| e.to_status())?;
        Ok(Response::new(order_to_proto(&order)))
    }

    async fn list_orders(
        &self,
        request: Request<proto::ListOrdersRequest>,
    ) -> Result<Response<proto::ListOrdersReply>, Status> {
        let m = request.into_inner();
        let run = async || {
            let status = status_from_proto(m.status, "status")?;
            let limit = match m.limit as usize {
                0 => DEFAULT_LIMIT,
                n if n <= MAX_LIMIT => n,
                n => {
                    return Err(ApiError::from(Invalid::new(
                        "limit",
                        format!("{n} is over {MAX_LIMIT}"),
                    )));
                }
            };
            list_orders(&self.desk, status, limit).await
        };
        let orders = run().await.map_err(|e| e.to_status())?;
        Ok(Response::new(proto::ListOrdersReply {
            orders: orders.iter().map(order_to_proto).collect(),
        }))
    }
}

/// Spawns the gRPC server of the Order API on `listener` until `shutdown`: health, the
/// context/deadline layer, the fault layer on the `Orders` calls, and the fault admin
/// routes over HTTP/1.1 on the same port.
pub(super) async fn spawn(
    desk: OrderDesk,
    faults: Faults,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<JoinHandle<Result<(), ServeError>>, ServeError> {
    let server = proto::orders_server::OrdersServer::new(OrdersService::new(desk))
        .max_decoding_message_size(BODY_LIMIT);
    let orders = tower::Layer::layer(&FaultLayer::new(faults.clone()), server);
    Ok(crate::services::spawn_grpc(SERVICE, orders, faults, listener, shutdown).await)
}
