//! Anthropic's Messages dialect (`/v1/messages`): a conversation rendered as its request
//! (`request`), its answers and event streams read into the model (`answer`); and the other way,
//! an app's request read (`inbound`) and answers and streams written (`render`).

pub mod answer;
pub mod inbound;
pub mod render;
pub mod request;

pub use answer::{answer, usage_of, StreamReader};
pub use inbound::MessagesRequest;
pub use request::request;

/// The API version the worker speaks (`anthropic-version`).
pub const VERSION: &str = "2023-06-01";
