//! Wire formats: OpenAI's (the worker's lingua franca), JSON bodies read with bounded memory
//! (`json`), and server-sent events.

pub mod json;
pub mod openai;
pub mod sse;
