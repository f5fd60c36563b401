//! A provider's event stream turned into the app's, event by event: read in the provider's
//! dialect into [`Delta`]s ([`Reader`]), written in the app's ([`Writer`]); or passed through
//! when both speak the same dialect (providers' `Passthrough`). Either way the relay learns the
//! usage the provider reported and how much was generated (to count usage it did not report).

use bytes::Bytes;

use crate::protocol::anthropic;
use crate::protocol::anthropic::render::EventWriter as MessagesWriter;
use crate::protocol::conversation::{Delta, Usage};
use crate::protocol::gemini;
use crate::protocol::gemini::render::EventWriter as GeminiWriter;
use crate::protocol::openai::chat_answer;
use crate::protocol::openai::chat_render::ChunkWriter;
use crate::protocol::openai::responses_render::EventWriter;
use crate::protocol::sse;

/// Turns a provider's event stream into the app's.
pub trait Translate: Send {
    /// Handles one upstream event, pushing what the app should receive.
    fn event(&mut self, ev: sse::Event, out: &mut Vec<Bytes>);
    /// The upstream stream ended: pushes the closing events.
    fn finish(&mut self, usage: Usage, out: &mut Vec<Bytes>);
    /// Usage as the provider reported it, if it did.
    fn reported_usage(&self) -> Option<Usage>;
    /// Bytes of generated text, reasoning and tool arguments seen so far (to count usage a
    /// provider did not report).
    fn generated_bytes(&self) -> usize;
    /// Whether the upstream said the answer is complete.
    fn completed(&self) -> bool;
    /// An error the worker itself ends the stream with (the answer cut or broken), in the app's
    /// dialect. By default OpenAI's.
    fn error(&mut self, message: &str, out: &mut Vec<Bytes>) {
        out.push(sse::data(
            &crate::protocol::openai::error_body(message, "server_error", Some("upstream_stream_error")).to_string(),
        ));
    }
}

/// A provider's stream, read into deltas.
pub enum Reader {
    OpenAiChat(chat_answer::StreamReader),
    Gemini(gemini::StreamReader),
    Anthropic(anthropic::StreamReader),
}

impl Reader {
    fn read(&mut self, ev: &sse::Event, out: &mut Vec<Delta>) {
        match self {
            Reader::OpenAiChat(r) => r.event(&ev.data, out),
            Reader::Gemini(r) => r.event(&ev.data, out),
            Reader::Anthropic(r) => r.event(ev.name.as_deref(), &ev.data, out),
        }
    }
}

/// Deltas written in the app's dialect.
pub enum Writer {
    OpenAiChat(ChunkWriter),
    Responses(EventWriter),
    Messages(MessagesWriter),
    Gemini(GeminiWriter),
}

impl Writer {
    fn write(&mut self, d: Delta, out: &mut Vec<Bytes>) {
        match self {
            Writer::OpenAiChat(w) => w.write(d, out),
            Writer::Responses(w) => w.write(d, out),
            Writer::Messages(w) => w.write(d, out),
            Writer::Gemini(w) => w.write(d, out),
        }
    }

    fn finish(&mut self, usage: Usage, out: &mut Vec<Bytes>) {
        match self {
            Writer::OpenAiChat(w) => w.finish(usage, out),
            Writer::Responses(w) => w.finish(usage, out),
            Writer::Messages(w) => w.finish(usage, out),
            Writer::Gemini(w) => w.finish(usage, out),
        }
    }
}

/// A stream read in one dialect and written in another.
pub struct Translated {
    reader: Reader,
    writer: Writer,
    usage: Option<Usage>,
    generated: usize,
    finished: bool,
    deltas: Vec<Delta>,
}

impl Translated {
    pub fn new(reader: Reader, writer: Writer) -> Translated {
        Translated {
            reader,
            writer,
            usage: None,
            generated: 0,
            finished: false,
            deltas: Vec::new(),
        }
    }
}

impl Translate for Translated {
    fn event(&mut self, ev: sse::Event, out: &mut Vec<Bytes>) {
        self.reader.read(&ev, &mut self.deltas);
        for d in self.deltas.drain(..) {
            match &d {
                Delta::Usage(u) => self.usage = Some(*u),
                Delta::Text { text, .. } | Delta::Reasoning { text, .. } => self.generated += text.len(),
                Delta::ToolArguments { fragment, .. } => self.generated += fragment.len(),
                Delta::ToolCall { name, .. } => self.generated += name.len(),
                Delta::Finish { .. } => self.finished = true,
                Delta::Error { .. } => {}
            }
            self.writer.write(d, out);
        }
    }

    fn finish(&mut self, usage: Usage, out: &mut Vec<Bytes>) {
        self.writer.finish(usage, out);
    }

    fn error(&mut self, message: &str, out: &mut Vec<Bytes>) {
        self.writer.write(
            Delta::Error {
                message: message.to_string(),
            },
            out,
        );
    }

    fn reported_usage(&self) -> Option<Usage> {
        self.usage
    }

    fn generated_bytes(&self) -> usize {
        self.generated
    }

    fn completed(&self) -> bool {
        self.finished
    }
}

/// A stream passed on as it came, in the app's own dialect, read on the way for its usage and
/// what it generated.
pub struct Observed {
    reader: Reader,
    usage: Option<Usage>,
    generated: usize,
    finished: bool,
    deltas: Vec<Delta>,
}

impl Observed {
    pub fn new(reader: Reader) -> Observed {
        Observed {
            reader,
            usage: None,
            generated: 0,
            finished: false,
            deltas: Vec::new(),
        }
    }
}

impl Translate for Observed {
    fn event(&mut self, ev: sse::Event, out: &mut Vec<Bytes>) {
        self.reader.read(&ev, &mut self.deltas);
        for d in self.deltas.drain(..) {
            match d {
                Delta::Usage(u) => self.usage = Some(u),
                Delta::Text { text, .. } | Delta::Reasoning { text, .. } => self.generated += text.len(),
                Delta::ToolArguments { fragment, .. } => self.generated += fragment.len(),
                Delta::Finish { .. } => self.finished = true,
                _ => {}
            }
        }
        out.push(ev.raw);
    }

    fn finish(&mut self, _usage: Usage, _out: &mut Vec<Bytes>) {}

    fn reported_usage(&self) -> Option<Usage> {
        self.usage
    }

    fn generated_bytes(&self) -> usize {
        self.generated
    }

    fn completed(&self) -> bool {
        self.finished
    }

    fn error(&mut self, message: &str, out: &mut Vec<Bytes>) {
        match self.reader {
            Reader::Gemini(_) => out.push(sse::data(
                &serde_json::json!({"error": {"code": 500, "message": message, "status": "INTERNAL"}}).to_string(),
            )),
            Reader::Anthropic(_) => out.push(sse::named(
                "error",
                &serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}}).to_string(),
            )),
            Reader::OpenAiChat(_) => out.push(sse::data(
                &crate::protocol::openai::error_body(message, "server_error", Some("upstream_stream_error"))
                    .to_string(),
            )),
        }
    }
}
