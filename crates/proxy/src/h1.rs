//! HTTP/1.1 to instances: one request at a time on a connection owned by the request.
//!
//! Written here rather than used from hyper's client on purpose: hyper drives each
//! client connection from a task of its own and hands every request and response
//! across a channel to it — a task switch and two channel operations per request,
//! which the profile showed as most of the user-space time we spent beyond HAProxy's.
//! Here the request's own task writes the head, parses the answer (with `httparse`,
//! as hyper does) and, when the whole answer is already in (the usual case), hands the
//! connection back to the pool before the client has even been answered. Upgrades
//! (WebSockets) still go through hyper's client.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Answer heads above this size are refused (the instance is misbehaving).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Answer heads with more header lines than this are refused.
const MAX_HEADERS: usize = 128;
/// Bodies up to this size go out in the same `write` as the head.
const INLINE_BODY: usize = 16 * 1024;
/// How much more to read at once.
const READ_CHUNK: usize = 8 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connection lost: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed before an answer came")]
    ClosedEarly,
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
}

/// A keep-alive connection to one instance, with what was read but not yet used.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Still open and quiet. An idle connection has nothing to say: readable means
    /// closed (or a misbehaving instance). Costs no system call while tokio knows the
    /// socket has nothing to read.
    pub fn idle_and_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads more into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
        // Through `poll_read`, not `try_read`: a read that does not fill the buffer
        // tells tokio the socket is drained, which saves the next read's EAGAIN.
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
    }
}

/// Writes a request: the head (hop-by-hop headers already removed by the caller,
/// framing set here from the buffered body) and the body.
pub async fn write_request(
    conn: &mut Conn,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(256 + headers.len() * 32 + body.len().min(INLINE_BODY));
    request_head(&mut out, method, path, headers, body.len());
    if body.len() <= INLINE_BODY {
        out.extend_from_slice(body);
        conn.stream.write_all(&out).await
    } else {
        conn.stream.write_all(&out).await?;
        conn.stream.write_all(body).await
    }
}

/// The request head as sent to an instance: the framing is ours (`content-length` of
/// the body read whole), whatever the client sent.
pub(crate) fn request_head(
    out: &mut Vec<u8>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body_len: usize,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if body_len > 0 || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body_len.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How the answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the instance closes the connection.
    Eof,
}

/// An answer head, and how its body ends.
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// Reads the answer's head, skipping interim (1xx) answers.
pub async fn read_head(conn: &mut Conn, method: &Method) -> Result<Head, H1Error> {
    let mut got_any = false;
    loop {
        if !conn.buf.is_empty() {
            got_any = true;
            if let Some(head) = parse_head(&mut conn.buf, method)? {
                if head.status.is_informational() {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(H1Error::Malformed("101 to a request that asked no upgrade"));
                    }
                    continue;
                }
                return Ok(head);
            }
        }
        let read = match poll_fn(|cx| conn.poll_fill(cx)).await {
            // Reset before any answer: as good as closed (a reused connection the
            // instance had closed meanwhile).
            Err(_) if !got_any => return Err(H1Error::ClosedEarly),
            r => r?,
        };
        if read == 0 {
            return Err(if got_any {
                H1Error::Malformed("connection closed inside the answer head")
            } else {
                H1Error::ClosedEarly
            });
        }
    }
}

#[cfg(fuzzing)]
pub(crate) fn parse_head_for_fuzzing(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<Head>, H1Error> {
    parse_head(buf, method)
}

fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, H1Error> {
    // Where each name and value sits in the buffer, so they can be shared, not copied.
    let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut raw);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(H1Error::Malformed("answer head too large"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Malformed("too many header lines"));
            }
            Err(_) => return Err(H1Error::Malformed("not an HTTP/1.x answer")),
        };
        let base = buf.as_ptr() as usize;
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            let n = h.name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            *span = (n, n + h.name.len(), v, v + h.value.len());
        }
        (
            len,
            resp.code.unwrap_or(0),
            resp.version.unwrap_or(1),
            resp.headers.len(),
        )
    };
    let raw = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| H1Error::Malformed("bad status code"))?;
    let mut headers = HeaderMap::with_capacity(count);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut close = minor == 0;
    for &(ns, ne, vs, ve) in &spans[..count] {
        let name = HeaderName::from_bytes(&raw[ns..ne])
            .map_err(|_| H1Error::Malformed("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(raw.slice(vs..ve))
            .map_err(|_| H1Error::Malformed("bad header value"))?;
        if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(H1Error::Malformed("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Malformed("conflicting content-length"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            encoded = true;
            chunked = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == header::CONNECTION {
            for token in value.to_str().unwrap_or("").split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if minor == 0 && token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
        headers.append(name, value);
    }
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if encoded && length.is_some() {
        // Both: the length is wrong by definition (RFC 9112 §6.3) and must not reach
        // the client; the connection is not trusted with another request.
        headers.remove(header::CONTENT_LENGTH);
        close = true;
    }
    let framing = if bodiless {
        Framing::Length(0)
    } else if encoded {
        // A transfer coding wins over any length (RFC 9112 §6.3); one not ending in
        // chunked runs until the close.
        if chunked {
            Framing::Chunked
        } else {
            Framing::Eof
        }
    } else {
        length.map_or(Framing::Eof, Framing::Length)
    };
    Ok(Some(Head {
        status,
        version: if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        },
        headers,
        keep_alive: !close && framing != Framing::Eof,
        framing,
    }))
}

/// Where a body's connection goes once the body is fully read.
pub type Checkin = fn(SocketAddr, Conn);

/// An answer's body, read from the instance as the client takes it. A body fully
/// buffered when the head was read is a single frame and its connection is already
/// back in the pool.
#[derive(Debug)]
pub struct UpBody {
    state: State,
    conn: Option<Conn>,
    keep_alive: bool,
    addr: SocketAddr,
    checkin: Checkin,
}

#[derive(Debug)]
enum State {
    Done,
    Whole(Bytes),
    Length(u64),
    /// Inside a chunk, this many bytes left of it.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    ChunkSize,
    /// After the last chunk: trailer lines (dropped), then an empty line.
    Trailers,
    Eof,
}

impl UpBody {
    /// The body that follows `head` on `conn`; `checkin` takes the connection back
    /// once the body has been read to its end, if it can carry another request.
    pub fn new(head: &Head, mut conn: Conn, addr: SocketAddr, checkin: Checkin) -> UpBody {
        let state = match head.framing {
            Framing::Length(n) if conn.buf.len() as u64 >= n => {
                let whole = conn.buf.split_to(n as usize).freeze();
                if head.keep_alive && conn.buf.is_empty() {
                    checkin(addr, conn);
                }
                let state = if whole.is_empty() {
                    State::Done
                } else {
                    State::Whole(whole)
                };
                return UpBody {
                    state,
                    conn: None,
                    keep_alive: false,
                    addr,
                    checkin,
                };
            }
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Eof => State::Eof,
        };
        UpBody {
            state,
            conn: Some(conn),
            keep_alive: head.keep_alive,
            addr,
            checkin,
        }
    }

    /// The body is complete: its connection goes back if it can carry another request.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            (self.checkin)(self.addr, conn);
        }
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(match std::mem::replace(&mut self.state, State::Done) {
                    State::Whole(b) => Some(Ok(Frame::data(b))),
                    _ => None,
                });
            };
            match self.state {
                State::Done | State::Whole(_) => return Poll::Ready(None),
                State::Length(0) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                State::Length(left) => {
                    if conn.buf.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(H1Error::Malformed(
                            "connection closed inside the body",
                        ))));
                    }
                    let n = (conn.buf.len() as u64).min(left);
                    let data = conn.buf.split_to(n as usize).freeze();
                    self.state = State::Length(left - n);
                    if left == n {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Eof => {
                    if conn.buf.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkSize => match httparse::parse_chunk_size(&conn.buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        conn.buf.advance(used);
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if conn.buf.len() < 1024 => {
                        ready!(self.need_more(cx))?;
                    }
                    _ => return Poll::Ready(Some(Err(H1Error::Malformed("bad chunk size")))),
                },
                State::ChunkData(left) => {
                    if conn.buf.is_empty() {
                        ready!(self.need_more(cx))?;
                        continue;
                    }
                    let n = (conn.buf.len() as u64).min(left);
                    let data = conn.buf.split_to(n as usize).freeze();
                    self.state = if left == n {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left - n)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkEnd => {
                    if conn.buf.len() < 2 {
                        ready!(self.need_more(cx))?;
                        continue;
                    }
                    if &conn.buf[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(H1Error::Malformed("bad chunk end"))));
                    }
                    conn.buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    if conn.buf.starts_with(b"\r\n") {
                        conn.buf.advance(2);
                        self.finish();
                        return Poll::Ready(None);
                    }
                    if let Some(end) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        conn.buf.advance(end + 4);
                        self.finish();
                        return Poll::Ready(None);
                    }
                    if conn.buf.len() > MAX_HEAD_BYTES {
                        return Poll::Ready(Some(Err(H1Error::Malformed("trailers too large"))));
                    }
                    ready!(self.need_more(cx))?;
                }
            }
        }
    }

    /// Reads more; the end of the stream here is an error (the body was not over).
    fn need_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Err(H1Error::ClosedEarly));
        };
        match ready!(conn.poll_fill(cx))? {
            0 => Poll::Ready(Err(H1Error::Malformed("connection closed inside the body"))),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match ready!(this.step(cx)) {
            Some(Err(e)) => {
                // The connection is in an unknown state: it is not reused.
                this.conn = None;
                this.state = State::Done;
                Poll::Ready(Some(Err(e.into())))
            }
            other => Poll::Ready(other.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Whole(ref b) => SizeHint::with_exact(b.len() as u64),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    /// A test instance on loopback: `serve` runs for each connection, in a task of its
    /// own. Returns the address and the count of connections accepted so far.
    pub(crate) async fn counting_instance<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        (addr, conns)
    }

    /// An instance that answers every request with `answer`, one byte per write (so
    /// the parser sees it in many pieces), closing the connection after each answer
    /// when `close` is set. Counts connections.
    pub(crate) async fn instance(
        answer: &'static [u8],
        close: bool,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        counting_instance(move |mut s| async move {
            let _ = s.set_nodelay(true);
            {
                let mut got = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        for b in answer {
                            if s.write_all(&[*b]).await.is_err() {
                                return;
                            }
                        }
                        if close {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                }
            }
        })
        .await
    }

    /// One request on `conn`; the answer's status, body and whether the connection
    /// came back for another request.
    async fn exchange(
        conn: Conn,
        addr: SocketAddr,
        method: Method,
    ) -> Result<(StatusCode, Bytes, Option<Conn>), BoxError> {
        thread_local! {
            static BACK: std::cell::RefCell<Option<Conn>> = const { std::cell::RefCell::new(None) };
        }
        fn back(_: SocketAddr, c: Conn) {
            BACK.with(|b| *b.borrow_mut() = Some(c));
        }
        let mut conn = conn;
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("x"));
        write_request(&mut conn, &method, "/", &headers, &Bytes::new()).await?;
        let head = read_head(&mut conn, &method).await?;
        let body = UpBody::new(&head, conn, addr, back);
        let bytes = body.collect().await?.to_bytes();
        Ok((head.status, bytes, BACK.with(|b| b.borrow_mut().take())))
    }

    async fn open(addr: SocketAddr) -> Conn {
        Conn::new(TcpStream::connect(addr).await.expect("connect"))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn chunked_answers_with_extensions_and_trailers_are_read_whole_and_reused() {
        let (addr, conns) = instance(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n",
            false,
        )
        .await;
        let mut conn = open(addr).await;
        for _ in 0..3 {
            let (status, body, back) = exchange(conn, addr, Method::GET).await.expect("answer");
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"hello, world");
            conn = back.expect("the connection comes back after the last chunk");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn lengths_interim_answers_and_head_requests_are_framed() {
        let (addr, _) = instance(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            false,
        )
        .await;
        let (status, body, back) = exchange(open(addr).await, addr, Method::GET)
            .await
            .expect("answer");
        assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"hello"[..]));
        assert!(back.is_some());
        // The same answer to HEAD has no body: the next answer starts at once.
        let (addr, _) = instance(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false).await;
        let (status, body, back) = exchange(open(addr).await, addr, Method::HEAD)
            .await
            .expect("answer");
        assert_eq!((status, body.len()), (StatusCode::OK, 0));
        assert!(back.is_some());
    }

    /// The bytes a request goes out as.
    async fn written(method: Method, headers: HeaderMap, body: &'static [u8]) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut conn = open(addr).await;
        let (mut s, _) = l.accept().await.expect("accept");
        write_request(
            &mut conn,
            &method,
            "/a?b=c",
            &headers,
            &Bytes::from_static(body),
        )
        .await
        .expect("write");
        drop(conn);
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test(flavor = "current_thread")]
    async fn requests_go_out_with_their_own_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("svc"));
        // A client's own length (say, of a chunked body now buffered) is replaced.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.append("x-many", HeaderValue::from_static("1"));
        headers.append("x-many", HeaderValue::from_static("2"));
        assert_eq!(
            written(Method::POST, headers.clone(), b"hello").await,
            "POST /a?b=c HTTP/1.1\r\nhost: svc\r\nx-many: 1\r\nx-many: 2\r\ncontent-length: 5\r\n\r\nhello"
        );
        assert_eq!(
            written(Method::POST, headers.clone(), b"").await,
            "POST /a?b=c HTTP/1.1\r\nhost: svc\r\nx-many: 1\r\nx-many: 2\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(
            written(Method::GET, headers, b"").await,
            "GET /a?b=c HTTP/1.1\r\nhost: svc\r\nx-many: 1\r\nx-many: 2\r\n\r\n"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_transfer_coding_wins_over_a_length_which_is_dropped() {
        let (addr, _) = instance(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            false,
        )
        .await;
        let mut conn = open(addr).await;
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("x"));
        write_request(&mut conn, &Method::GET, "/", &headers, &Bytes::new())
            .await
            .expect("write");
        let head = read_head(&mut conn, &Method::GET).await.expect("head");
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH));
        assert!(!head.keep_alive, "not trusted with another request");
        let body = UpBody::new(&head, conn, addr, |_, _| panic!("not reused"));
        let bytes = body.collect().await.expect("body").to_bytes();
        assert_eq!(&bytes[..], b"ok");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_without_length_run_to_the_close_and_close_means_no_reuse() {
        let (addr, _) = instance(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", true).await;
        let (_, body, back) = exchange(open(addr).await, addr, Method::GET)
            .await
            .expect("answer");
        assert_eq!(&body[..], b"until the end");
        assert!(back.is_none());
        let (addr, _) = instance(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            true,
        )
        .await;
        let (_, body, back) = exchange(open(addr).await, addr, Method::GET)
            .await
            .expect("answer");
        assert_eq!(&body[..], b"ok");
        assert!(back.is_none(), "the instance said it closes");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn malformed_answers_are_errors_not_guesses() {
        for (answer, why) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"[..],
                "conflicting content-length",
            ),
            (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], "not an HTTP/1.x answer"),
            (
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
                "bad chunk size",
            ),
        ] {
            let (addr, _) = instance(answer, true).await;
            let err = exchange(open(addr).await, addr, Method::GET)
                .await
                .expect_err("malformed");
            assert!(err.to_string().contains(why), "{err} (wanted {why})");
        }
        // A head that never ends is cut off at the limit, not buffered for ever; so is
        // one with more lines than the limit.
        let leak =
            |parts: &[&[u8]]| -> &'static [u8] { Box::leak(parts.concat().into_boxed_slice()) };
        for (answer, why) in [
            (
                leak(&[
                    b"HTTP/1.1 200 OK\r\nx-pad: ",
                    &b"y".repeat(MAX_HEAD_BYTES + 10),
                ]),
                "too large",
            ),
            (
                leak(&[
                    b"HTTP/1.1 200 OK\r\n",
                    &b"x-pad: y\r\n".repeat(MAX_HEADERS + 1),
                    b"\r\n",
                ]),
                "too many header lines",
            ),
        ] {
            let (addr, _) = instance(answer, true).await;
            let err = exchange(open(addr).await, addr, Method::GET)
                .await
                .expect_err("refused");
            assert!(err.to_string().contains(why), "{err} (wanted {why})");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_body_cut_short_is_an_error_and_its_connection_is_not_reused() {
        let (addr, _) = instance(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", true).await;
        let err = exchange(open(addr).await, addr, Method::GET)
            .await
            .expect_err("cut short");
        assert!(err.to_string().contains("inside the body"), "{err}");
        let (addr, _) = instance(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            true,
        )
        .await;
        let err = exchange(open(addr).await, addr, Method::GET)
            .await
            .expect_err("cut short");
        assert!(err.to_string().contains("inside the body"), "{err}");
    }
}
