//! Wire formats: OpenAI's (the worker's lingua franca) and server-sent events.

pub mod openai;
pub mod sse;
