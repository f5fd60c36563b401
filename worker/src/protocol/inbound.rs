//! A chat request as an app sent it, in whichever dialect it came: what the gateway needs of it
//! (the model and user it names, whether it streams, its estimate and output cap) and the
//! request read as a conversation for a provider of another dialect.

use crate::protocol::anthropic::MessagesRequest;
use crate::protocol::conversation::{Conversation, Dialect};
use crate::protocol::gemini::GeminiRequest;
use crate::protocol::openai::{ChatRequest, ResponsesRequest};

#[derive(Debug, Clone)]
pub enum Inbound {
    /// OpenAI's chat completions.
    Chat(ChatRequest),
    /// OpenAI's Responses API.
    Responses(ResponsesRequest),
    /// Anthropic's Messages.
    Messages(MessagesRequest),
    /// Gemini's own `generateContent`.
    Gemini(GeminiRequest),
}

impl Inbound {
    pub fn dialect(&self) -> Dialect {
        match self {
            Inbound::Chat(_) => Dialect::OpenAiChat,
            Inbound::Responses(_) => Dialect::OpenAiResponses,
            Inbound::Messages(_) => Dialect::Anthropic,
            Inbound::Gemini(_) => Dialect::Gemini,
        }
    }

    pub fn model(&self) -> Option<&str> {
        match self {
            Inbound::Chat(r) => r.model(),
            Inbound::Responses(r) => r.model(),
            Inbound::Messages(r) => r.model(),
            Inbound::Gemini(r) => r.model(),
        }
    }

    pub fn user(&self) -> Option<&str> {
        match self {
            Inbound::Chat(r) => r.user(),
            Inbound::Responses(r) => r.user(),
            Inbound::Messages(r) => r.user(),
            Inbound::Gemini(_) => None,
        }
    }

    pub fn stream(&self) -> bool {
        match self {
            Inbound::Chat(r) => r.stream(),
            Inbound::Responses(r) => r.stream(),
            Inbound::Messages(r) => r.stream(),
            Inbound::Gemini(r) => r.stream(),
        }
    }

    /// Whether the app asked for usage at the end of a stream (the Responses API always gets it).
    pub fn wants_stream_usage(&self) -> bool {
        match self {
            Inbound::Chat(r) => r.wants_stream_usage(),
            Inbound::Responses(_) | Inbound::Messages(_) | Inbound::Gemini(_) => true,
        }
    }

    /// The output cap the app set, if it did.
    pub fn max_tokens(&self) -> Option<u64> {
        match self {
            Inbound::Chat(r) => r.max_tokens(),
            Inbound::Responses(r) => r.max_tokens(),
            Inbound::Messages(r) => Some(r.max_tokens()),
            Inbound::Gemini(r) => r.max_tokens(),
        }
    }

    /// The output cap of a choice when the app set none.
    pub fn default_output_cap(&self, default_max_tokens: u32) -> u64 {
        match self {
            Inbound::Chat(r) => r.default_output_cap(default_max_tokens),
            Inbound::Responses(r) => r.default_output_cap(default_max_tokens),
            Inbound::Messages(r) => r.max_tokens(),
            Inbound::Gemini(r) => r.default_output_cap(default_max_tokens),
        }
    }

    pub fn estimate_prompt_tokens(&self) -> i64 {
        match self {
            Inbound::Chat(r) => r.estimate_prompt_tokens(),
            Inbound::Responses(r) => r.estimate_prompt_tokens(),
            Inbound::Messages(r) => r.estimate_prompt_tokens(),
            Inbound::Gemini(r) => r.estimate_prompt_tokens(),
        }
    }

    /// What a reservation charges up front: the prompt and the most the answer may use.
    pub fn estimate_tokens(&self, default_max_tokens: u32) -> i64 {
        match self {
            Inbound::Chat(r) => r.estimate_tokens(default_max_tokens),
            Inbound::Responses(r) => r.estimate_prompt_tokens() + r.estimate_completion_tokens(default_max_tokens),
            Inbound::Messages(r) => r.estimate_tokens(),
            Inbound::Gemini(r) => r.estimate_tokens(default_max_tokens),
        }
    }

    /// The request as a conversation. The error is the caller's.
    pub fn conversation(&self) -> Result<Conversation<'_>, String> {
        match self {
            Inbound::Chat(r) => r.conversation(),
            Inbound::Responses(r) => r.conversation(),
            Inbound::Messages(r) => r.conversation(),
            Inbound::Gemini(r) => r.conversation(),
        }
    }
}
