//! The connections of one instance (decision 0004, *Sixth pass*): HTTP/1.1 keep-alive
//! connections on hyper's connection API, reused most-recent-first (the HTTP client), and
//! one HTTP/2 connection on h2, shared by every call (the gRPC client).
//!
//! Both clients already choose the instance, bound each attempt by its deadline and
//! retry; what is left to the transport is to hold connections. hyper-util's pooled
//! client would hash a pool key and spawn a task per call to put an HTTP/1 connection
//! back, and tonic's `Channel` passes every call through a `Buffer` task and arms a
//! second timer from the `grpc-timeout` header that the attempt's own timer already
//! enforces.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body_util::Full;
use hyper::body::Frame;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an HTTP/1.1 connection may sit unused before it is closed (when the next
/// call to its instance finds it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no connection could be made to an instance. Nothing was sent then.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The instance's URL is not one this client can call.
    #[error("instance URL `{url}` cannot be called: {why} (register it as `http://host:port`)")]
    Url {
        /// The URL as registered.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The TCP connect did not finish in time.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// The TCP connect failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The HTTP/1.1 handshake failed.
    #[error("HTTP/1.1 handshake failed: {0}")]
    Http1(#[from] hyper::Error),
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake failed: {0}")]
    Http2(#[from] h2::Error),
    /// The HTTP/2 connection would not take a new stream (it is closing).
    #[error("the HTTP/2 connection takes no new stream: {0}")]
    Refused(h2::Error),
}

/// Where an instance is: its scheme and authority (for request URIs), the address to
/// connect to, its `host` header and the path its URL puts before every HTTP request's,
/// parsed once from its URL.
#[derive(Debug)]
pub(crate) struct Origin {
    scheme: Scheme,
    authority: Authority,
    host_header: HeaderValue,
    /// The URL's path without its trailing `/` (`http://host:port/api` → `/api`), when
    /// it has one. gRPC calls ignore it, as tonic does.
    pub(crate) path_prefix: Option<Box<str>>,
}

impl Origin {
    /// Parses an instance URL: `http://host[:port][/path]`, no query.
    pub(crate) fn parse(url: &str) -> Result<Origin, ConnectError> {
        let bad = |why| ConnectError::Url {
            url: url.to_string(),
            why,
        };
        let uri = url
            .parse::<http::Uri>()
            .map_err(|_| bad("not a valid URI"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(bad("only plain `http` is supported"));
        }
        if uri.query().is_some() {
            return Err(bad("it has a query"));
        }
        let path = uri.path().trim_end_matches('/');
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|_| bad("its host is not a valid header value"))?;
        Ok(Origin {
            scheme: Scheme::HTTP,
            authority,
            host_header,
            path_prefix: (!path.is_empty()).then(|| path.into()),
        })
    }

    /// The absolute URI of `path` on this instance, as HTTP/2 sends it (`:scheme`,
    /// `:authority`, `:path`).
    pub(crate) fn uri(&self, path: PathAndQuery) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }

    /// The value of the `host` header of a request to this instance.
    pub(crate) fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    async fn connect_tcp(&self) -> Result<TcpStream, ConnectError> {
        let host = self.authority.host();
        // An IPv6 literal comes bracketed in a URL, not in a socket address.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = self.authority.port_u16().unwrap_or(80);
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| ConnectError::Timeout(CONNECT_TIMEOUT))??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// The HTTP/1.1 sender of one connection.
pub(crate) type Http1Sender = http1::SendRequest<Full<Bytes>>;

struct IdleConnection {
    sender: Http1Sender,
    since: std::time::Instant,
}

/// The idle HTTP/1.1 connections of one instance. A call takes one (or makes one), and
/// gives it back once it has read the whole response; a call that is dropped midway
/// drops its connection (hyper closes it).
#[derive(Default)]
pub(crate) struct Http1Connections {
    idle: Mutex<Vec<IdleConnection>>,
}

impl Http1Connections {
    fn lock(&self) -> MutexGuard<'_, Vec<IdleConnection>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection that is still open, if any. One idle
    /// for longer than 30 s is closed instead, with every older one.
    pub(crate) fn take(&self) -> Option<Http1Sender> {
        let now = std::time::Instant::now();
        let mut idle = self.lock();
        while let Some(c) = idle.pop() {
            if now.duration_since(c.since) > IDLE_TIMEOUT {
                idle.clear();
                return None;
            }
            if !c.sender.is_closed() {
                return Some(c.sender);
            }
        }
        None
    }

    /// Gives a connection back after its response was read whole; connections idle
    /// for longer than 30 s are closed.
    pub(crate) fn put(&self, sender: Http1Sender) {
        if sender.is_closed() {
            return;
        }
        let now = std::time::Instant::now();
        let mut idle = self.lock();
        let stale = idle
            .iter()
            .take_while(|c| now.duration_since(c.since) > IDLE_TIMEOUT)
            .count();
        if stale > 0 {
            idle.drain(..stale);
        }
        idle.push(IdleConnection { sender, since: now });
    }

    /// Opens a new connection to `origin`; its I/O runs on a task of its own.
    pub(crate) async fn connect(origin: &Origin) -> Result<Http1Sender, ConnectError> {
        let stream = origin.connect_tcp().await?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }
}

/// The HTTP/2 side of one connection (its clones share it).
pub(crate) type Http2Sender = h2::client::SendRequest<Bytes>;

/// An open HTTP/2 connection: its sender and whether its I/O task has ended.
struct Http2Open {
    sender: Http2Sender,
    ended: Arc<AtomicBool>,
}

/// The one HTTP/2 connection of an instance, made on first use and made again when it
/// ends. Calls open their streams on it directly (h2's `SendRequest`), without a task
/// between the caller and the connection.
#[derive(Default)]
pub(crate) struct Http2Connection {
    current: Mutex<Option<Http2Open>>,
    /// Held while connecting, so that concurrent calls wait for one connection instead
    /// of each making their own.
    connecting: tokio::sync::Mutex<()>,
}

impl Http2Connection {
    fn open(&self) -> Option<(Http2Sender, Arc<AtomicBool>)> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current
            .as_ref()
            .filter(|c| !c.ended.load(Ordering::Acquire))
            .map(|c| (c.sender.clone(), c.ended.clone()))
    }

    /// A sender ready to open a stream. A connection found ended here (nothing was sent
    /// on it by this call) is marked so and made again, once.
    pub(crate) async fn ready_sender(&self, origin: &Origin) -> Result<Http2Sender, ConnectError> {
        let (sender, ended) = self.sender(origin).await?;
        match sender.ready().await {
            Ok(s) => Ok(s),
            Err(_) => {
                ended.store(true, Ordering::Release);
                let (sender, _) = self.sender(origin).await?;
                Ok(sender.ready().await.map_err(ConnectError::Refused)?)
            }
        }
    }

    /// A sender on the open connection, connecting first if there is none; with the
    /// connection's "ended" mark.
    async fn sender(
        &self,
        origin: &Origin,
    ) -> Result<(Http2Sender, Arc<AtomicBool>), ConnectError> {
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let stream = origin.connect_tcp().await?;
        // hyper's client settings (tonic's `Channel` uses them).
        let handshake = h2::client::Builder::new()
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .max_frame_size(16 * 1024)
            .max_header_list_size(16 * 1024)
            .max_send_buffer_size(1024 * 1024)
            .max_local_error_reset_streams(Some(1024))
            .enable_push(false)
            .handshake::<_, Bytes>(stream);
        let (sender, connection) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| ConnectError::Timeout(CONNECT_TIMEOUT))??;
        let ended = Arc::new(AtomicBool::new(false));
        let mark = ended.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP/2 connection ended");
            }
            mark.store(true, Ordering::Release);
        });
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(Http2Open {
            sender: sender.clone(),
            ended: ended.clone(),
        });
        Ok((sender, ended))
    }
}

/// The body of an HTTP/2 response, read straight from its h2 stream: each DATA frame's
/// bytes are given back to the flow-control window as they are handed on, then the
/// trailers (where gRPC puts its status).
pub(crate) struct Http2Body {
    recv: h2::RecvStream,
    data_done: bool,
}

impl Http2Body {
    /// The body of the response whose stream is `recv`.
    pub(crate) fn new(recv: h2::RecvStream) -> Self {
        Http2Body {
            recv,
            data_done: false,
        }
    }
}

impl hyper::body::Body for Http2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Cannot fail for bytes this stream received.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Sends a request body on its h2 stream. What is ready is sent at once (a unary call's
/// whole message); a body that has to wait is sent by a task of its own, so that the
/// response can be read meanwhile.
pub(crate) async fn send_body<B>(mut body: B, mut stream: h2::SendStream<Bytes>)
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let first =
        std::future::poll_fn(|cx| Poll::Ready(poll_send_body(&mut body, &mut stream, cx))).await;
    if first.is_pending() {
        tokio::spawn(std::future::poll_fn(move |cx| {
            poll_send_body(&mut body, &mut stream, cx)
        }));
    }
}

/// Sends what `body` has ready; `Ready` once it is all sent, or nothing more can be.
fn poll_send_body<B>(
    body: &mut B,
    stream: &mut h2::SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<()>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            // While the body waits, a reset by the callee (or the end of the
            // connection) ends the sending too.
            Poll::Pending if stream.poll_reset(cx).is_ready() => return Poll::Ready(()),
            Poll::Pending => return Poll::Pending,
        };
        let (sent, last) = match frame {
            None => (stream.send_data(Bytes::new(), true), true),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let last = body.is_end_stream();
                    (stream.send_data(data, last), last)
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => (stream.send_trailers(trailers), true),
                    Err(_) => continue,
                },
            },
            Some(Err(e)) => {
                tracing::debug!(error = %e, "request body failed; stream reset");
                stream.send_reset(h2::Reason::CANCEL);
                return Poll::Ready(());
            }
        };
        if sent.is_err() || last {
            return Poll::Ready(());
        }
    }
}

/// The connections of one instance, shared by the clients that call it.
pub(crate) struct Connections {
    /// Where the instance is, or why its URL cannot be called.
    pub(crate) origin: Result<Origin, Arc<ConnectError>>,
    /// Idle HTTP/1.1 connections (HTTP client).
    pub(crate) http1: Http1Connections,
    /// The HTTP/2 connection (gRPC client).
    pub(crate) http2: Http2Connection,
}

impl Connections {
    /// The (not yet opened) connections of the instance at `url`.
    pub(crate) fn new(url: &str) -> Self {
        Connections {
            origin: Origin::parse(url).map_err(Arc::new),
            http1: Http1Connections::default(),
            http2: Http2Connection::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn instance_urls_parse_or_say_what_is_wrong() {
        let o = Origin::parse("http://127.0.0.1:7003").unwrap();
        assert_eq!(o.host_header(), "127.0.0.1:7003");
        assert_eq!(o.path_prefix, None);
        let uri = o.uri(PathAndQuery::from_static("/pkg.Svc/M")).unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:7003/pkg.Svc/M");
        let o = Origin::parse("http://payment.internal/api/").unwrap();
        assert_eq!(o.host_header(), "payment.internal");
        assert_eq!(o.path_prefix.as_deref(), Some("/api"));
        let o = Origin::parse("http://[::1]:8080").unwrap();
        assert_eq!(o.host_header(), "[::1]:8080");
        for (url, why) in [
            ("https://127.0.0.1:7003", "plain `http`"),
            ("127.0.0.1:7003", "plain `http`"),
            ("http://127.0.0.1:7003/?x=1", "query"),
            ("not a url", "not a valid URI"),
        ] {
            let e = Origin::parse(url).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(url), "{url}: {e}");
        }
    }

    /// A request body that has one chunk at once and the rest only later.
    struct LaterBody {
        first: Option<Bytes>,
        rest: tokio::sync::mpsc::Receiver<Bytes>,
    }

    impl hyper::body::Body for LaterBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if let Some(first) = self.first.take() {
                return Poll::Ready(Some(Ok(Frame::data(first))));
            }
            self.rest
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    /// An h2 server on one end of an in-memory pipe that answers each request with its
    /// body's length in the headers, then `reply_len` bytes.
    async fn h2_pair(reply_len: usize) -> (Http2Sender, tokio::task::JoinHandle<()>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let mut got = 0;
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.unwrap();
                        got += chunk.len();
                        body.flow_control().release_capacity(chunk.len()).unwrap();
                    }
                    let resp = http::Response::builder()
                        .header("x-got", got.to_string())
                        .body(())
                        .unwrap();
                    let mut send = respond.send_response(resp, false).unwrap();
                    send.send_data(Bytes::from(vec![7u8; reply_len]), false)
                        .unwrap();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    send.send_trailers(trailers).unwrap();
                });
            }
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        (sender, server)
    }

    fn request() -> http::Request<()> {
        http::Request::post("http://test/pkg.Svc/M")
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn a_body_that_waits_is_sent_whole_while_the_call_goes_on() {
        let (sender, _server) = h2_pair(3).await;
        let mut sender = sender.ready().await.unwrap();
        let (response, stream) = sender.send_request(request(), false).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let body = LaterBody {
            first: Some(Bytes::from_static(b"hello ")),
            rest: rx,
        };
        // Returns with the second chunk still to come; a task of its own sends it.
        send_body(body, stream).await;
        tx.send(Bytes::from_static(b"world")).await.unwrap();
        drop(tx);
        let response = response.await.unwrap();
        assert_eq!(response.headers()["x-got"], "11");
        let collected = Http2Body::new(response.into_body())
            .collect()
            .await
            .unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes().len(), 3);
    }

    /// An answer larger than the stream's and the connection's flow-control windows
    /// (2 MiB and 5 MiB) arrives whole, twice on one connection: the body gives the
    /// window back as it reads.
    #[tokio::test]
    async fn an_answer_larger_than_the_windows_arrives_whole() {
        let (sender, _server) = h2_pair(6 * 1024 * 1024).await;
        for _ in 0..2 {
            let mut s = sender.clone().ready().await.unwrap();
            let (response, stream) = s.send_request(request(), false).unwrap();
            let body = LaterBody {
                first: Some(Bytes::from_static(b"x")),
                rest: tokio::sync::mpsc::channel(1).1,
            };
            send_body(body, stream).await;
            let response = response.await.unwrap();
            // Without the window given back the transfer stalls at 2 MiB.
            let read = Http2Body::new(response.into_body()).collect();
            let bytes = tokio::time::timeout(Duration::from_secs(20), read)
                .await
                .expect("the answer stalled: flow-control window not given back")
                .unwrap()
                .to_bytes();
            assert_eq!(bytes.len(), 6 * 1024 * 1024);
        }
    }
}
