//! Gemini's own dialect (`generateContent`, `streamGenerateContent?alt=sse`): a conversation
//! rendered as its request (`request`), its answers and streams read into the model (`answer`),
//! JSON Schemas as it takes them (`schema`); and the other way, an app's request read
//! (`inbound`) and answers and streams written (`render`).

pub mod answer;
pub mod inbound;
pub mod render;
pub mod request;
pub mod schema;

pub use answer::{answer, usage_of, StreamReader};
pub use inbound::GeminiRequest;
pub use request::request;
