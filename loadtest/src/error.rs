//! What can go wrong, for the run as a whole (bad configuration, the model cannot be listed) and
//! for one request (the report counts those by [`Error::kind`]).
//!
//! Messages carry their cause inline rather than as an error `source`: a request's failure is
//! stored in the report as one line of text, and that line has to say everything (which URL,
//! which status, what the server said).

use std::time::Duration;

/// A failure of the run or of one request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The base URL is not `http://host[:port][/prefix]`.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// A setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The TCP connection could not be made (refused, unreachable, unknown host).
    #[error("connecting to {url}: {cause}")]
    Connect { url: String, cause: String },
    /// Reading or writing the socket failed after the connection was made.
    #[error("{target}: {cause}")]
    Io { target: String, cause: String },
    /// The server answered with a status other than 200; `message` is the error object's
    /// message (or the start of the body when it is not an OpenAI error object).
    #[error("{target}: HTTP {status}: {message}")]
    Status {
        target: String,
        status: u16,
        message: String,
        /// The `Retry-After` header, when the server sent one.
        retry_after: Option<Duration>,
    },
    /// The response is not the HTTP/SSE/JSON it should be.
    #[error("{target}: malformed response: {reason}")]
    Protocol { target: String, reason: String },
    /// The server sent an error object inside a 200 stream (a sequence failed mid-way).
    #[error("{target}: the stream reported an error: {message}")]
    Stream { target: String, message: String },
    /// The run's time limit (`--timeout-s`) ended this before it completed.
    #[error("{what} did not finish within the run's time limit of {limit_s} s")]
    Timeout { what: String, limit_s: f64 },
    /// `GET /v1/models` listed nothing, so there is no model to default to.
    #[error("{target}: the server lists no models; name one with --model")]
    NoModel { target: String },
}

impl Error {
    /// The label failures are counted under in the report: `HTTP 429`, `connect`, `timeout`...
    pub fn kind(&self) -> String {
        match self {
            Error::InvalidUrl { .. } | Error::Config(_) => "config".into(),
            Error::Connect { .. } => "connect".into(),
            Error::Io { .. } => "io".into(),
            Error::Status { status, .. } => format!("HTTP {status}"),
            Error::Protocol { .. } => "protocol".into(),
            Error::Stream { .. } => "stream error".into(),
            Error::Timeout { .. } => "timeout".into(),
            Error::NoModel { .. } => "no model".into(),
        }
    }
}
