//! The guard every route sits behind, as one tower layer: the Host check
//! ([`super::host`]), the hardening headers ([`super::security`]) and the
//! request count for `/metrics`. One layer with a plain future instead of three
//! `from_fn` middlewares, which boxed a future and a service each per request.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use metrics::Counter;
use tower::{Layer, Service};

use super::host::{self, AllowedHosts};
use super::security;

/// What every [`Guard`] of one router shares.
struct Shared {
    hosts: AllowedHosts,
    tls: bool,
    /// `netkit_http_requests_total` by status class (1xx to 5xx), registered once.
    counts: [Counter; 5],
}

/// Wraps every route of a router in a [`Guard`].
#[derive(Clone)]
pub struct GuardLayer(Arc<Shared>);

impl GuardLayer {
    /// The guard for a server answering to `hosts`; `tls` adds HSTS.
    pub fn new(hosts: AllowedHosts, tls: bool) -> Self {
        // The counters bind to the recorder installed now, so install it first.
        let _ = super::metrics::handle();
        let counts = ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .map(|class| metrics::counter!("netkit_http_requests_total", "status" => class));
        GuardLayer(Arc::new(Shared { hosts, tls, counts }))
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            shared: self.0.clone(),
        }
    }
}

/// Refuses unknown hosts (421), counts every answer by status class and adds
/// the hardening headers to the ones the routes give.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request> for Guard<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let shared = self.shared.clone();
        if let Some(refused) = host::refusal(&shared.hosts, &req) {
            count(&shared, refused.status());
            return GuardFuture {
                inner: None,
                refused: Some(refused),
                host: None,
                shared,
            };
        }
        let host = req.headers().get(header::HOST).cloned();
        GuardFuture {
            inner: Some(self.inner.call(req)),
            refused: None,
            host,
            shared,
        }
    }
}

fn count(shared: &Shared, status: StatusCode) {
    let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
    shared.counts[class].increment(1);
}

pin_project_lite::pin_project! {
    /// The answer of a [`Guard`]: the route's, counted and hardened, or the refusal.
    pub struct GuardFuture<F> {
        // The route's future; `None` when the Host was refused.
        #[pin]
        inner: Option<F>,
        // The 421 answer, until it is given.
        refused: Option<Response>,
        // The request's Host (a page's Content-Security-Policy names it).
        host: Option<HeaderValue>,
        shared: Arc<Shared>,
    }
}

impl<F> Future for GuardFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(refused) = this.refused.take() {
            return Poll::Ready(Ok(refused));
        }
        let inner = this
            .inner
            .as_pin_mut()
            .expect("a GuardFuture is not polled after it is ready");
        let Ok(mut resp) = std::task::ready!(inner.poll(cx));
        count(this.shared, resp.status());
        security::harden(resp.headers_mut(), this.host.as_ref(), this.shared.tls);
        Poll::Ready(Ok(resp))
    }
}
