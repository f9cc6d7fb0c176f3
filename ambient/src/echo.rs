//! The mesh's echo app, for tests, conformance scenarios and the demo.
//!
//! The server answers on three kinds of port:
//! - HTTP: HTTP/1.1 and prior-knowledge h2c on the same port. Each request gets a JSON
//!   [`EchoReply`] describing it as the server saw it: pod, namespace, protocol, method, path,
//!   host, headers, peer and local address, body. `?status=NNN` picks the status; test hooks
//!   add delays (`?delay=MS`) and failures (`x-echo-fail-once`, `/echo/fail`), see [`hooks`].
//! - gRPC: the unary method `/echo.Echo/Echo` over h2c (see [`grpc`] for the messages); any
//!   other `/package.Service/Method` is answered the same way and the reply names the method,
//!   so routing by method can be seen. HTTP ports answer gRPC calls too, told apart by content
//!   type.
//! - TCP: a greeting line `echo <namespace>/<pod> <localAddr> from <remoteAddr>`, then every
//!   byte back until the client half-closes.
//!
//! The client makes one request per connection with any of the four protocols (HTTP/1.1, h2c,
//! gRPC, TCP) and reports failures as one-line reasons: `connection refused`, `reset by peer`,
//! `timed out after 5s`. An HTTP reply of any status is a reply; the command line counts
//! statuses other than 2xx as failures (`HTTP 503`).

mod client;
mod flags;
pub mod grpc;
pub mod hooks;
mod http;
mod idle;
mod proto;
mod server;
mod tcp;
mod watched;

pub use client::{
    ClientError, DEFAULT_TIMEOUT, HttpReply, Mode, Reply, Request, client_main, request,
};
pub use flags::{USAGE_EXIT_CODE, UsageError};
pub use grpc::{EchoRequest, EchoResponse};
pub use http::{EchoReply, MAX_BODY};
pub use server::{
    BoundAddr, DEFAULT_IDLE_TIMEOUT, DEFAULT_NAMESPACE, DEFAULT_POD, POD_NAME_ENV,
    POD_NAMESPACE_ENV, Port, Protocol, RunningServer, ServerConfig, serve, server_main, start,
};
