//! Wire formats. The conversation model (`conversation`) that every chat dialect parses into and
//! renders from: OpenAI's (`openai`: chat completions, embeddings), Gemini's own (`gemini`),
//! Anthropic's Messages (`anthropic`); streams translated event by event (`stream`); JSON
//! bodies read with bounded memory (`json`); server-sent events (`sse`).

pub mod anthropic;
pub mod conversation;
pub mod gemini;
pub mod inbound;
pub mod json;
pub mod openai;
pub mod sse;
pub mod stream;
