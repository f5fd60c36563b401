//! Gemini's own dialect (`generateContent`, `streamGenerateContent?alt=sse`): a conversation
//! rendered as its request (`request`), its answers and streams read into the model (`answer`),
//! JSON Schemas as it takes them (`schema`).

pub mod answer;
pub mod request;
pub mod schema;

pub use answer::{answer, StreamReader};
pub use request::request;
