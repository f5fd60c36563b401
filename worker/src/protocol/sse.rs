//! Server-sent events: an incremental parser that keeps each event's raw bytes, so that events
//! can be passed through unchanged as they arrive, and a writer for events the worker makes.

use bytes::{Bytes, BytesMut};

/// One event: its `event:` name (if any), its `data:` lines joined by newlines, and its bytes
/// exactly as received (including the blank line that ended it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: Option<String>,
    pub data: String,
    pub raw: Bytes,
}

/// Cuts a byte stream into events. Feed it chunks as they come; it returns the events that are
/// complete and keeps the rest.
#[derive(Default)]
pub struct Parser {
    buf: BytesMut,
    /// How much of `buf` holds no event end: scanning goes on from there (a long event that
    /// arrives in many chunks is scanned once, not once per chunk).
    scanned: usize,
}

/// Longest event accepted; a provider that sends more without a blank line is broken.
const MAX_EVENT: usize = 16 * 1024 * 1024;

impl Parser {
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Event>, String> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        // An event end is at most three bytes long: look again at the last two already seen.
        while let Some(end) = event_end(&self.buf, self.scanned.saturating_sub(2)) {
            let raw = self.buf.split_to(end).freeze();
            self.scanned = 0;
            if let Some(e) = parse(raw) {
                events.push(e);
            }
        }
        self.scanned = self.buf.len();
        if self.buf.len() > MAX_EVENT {
            return Err(format!("an event longer than {MAX_EVENT} bytes"));
        }
        Ok(events)
    }

    /// What is left when the stream ends: a last event without its blank line, if any.
    pub fn finish(&mut self) -> Option<Event> {
        if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
            return None;
        }
        parse(self.buf.split().freeze())
    }
}

/// The index just past the blank line that ends the first complete event, looking from `from`.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            // "\n\n" or "\n\r\n"
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

fn parse(raw: Bytes) -> Option<Event> {
    let text = String::from_utf8_lossy(&raw);
    let mut name = None;
    let mut data: Vec<&str> = Vec::new();
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => name = Some(value.to_string()),
            "data" => data.push(value),
            _ => {}
        }
    }
    if name.is_none() && data.is_empty() {
        return None;
    }
    let data = data.join("\n");
    Some(Event { name, data, raw })
}

/// An event with only a data line, as OpenAI streams them.
pub fn data(payload: &str) -> Bytes {
    Bytes::from(format!("data: {payload}\n\n"))
}

/// A named event.
pub fn named(name: &str, payload: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {payload}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_keep_their_bytes() {
        let mut p = Parser::default();
        assert!(p.feed(b"data: {\"a\":").unwrap().is_empty());
        let ev = p.feed(b"1}\n\ndata: [DONE]\n\n").unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].data, "{\"a\":1}");
        assert_eq!(&ev[0].raw[..], b"data: {\"a\":1}\n\n");
        assert_eq!(ev[1].data, "[DONE]");
        assert!(p.finish().is_none());
    }

    #[test]
    fn named_events_crlf_and_comments() {
        let mut p = Parser::default();
        let ev = p
            .feed(b": keep-alive\r\n\r\nevent: message_start\r\ndata: {\"x\":1}\r\n\r\nevent: ping\ndata:\n\n")
            .unwrap();
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(ev[0].name.as_deref(), Some("message_start"));
        assert_eq!(ev[0].data, "{\"x\":1}");
        assert_eq!(ev[1].name.as_deref(), Some("ping"));
    }

    #[test]
    fn multi_line_data_and_unterminated_tail() {
        let mut p = Parser::default();
        let ev = p.feed(b"data: a\ndata: b\n\ndata: tail").unwrap();
        assert_eq!(ev[0].data, "a\nb");
        assert_eq!(p.finish().map(|e| e.data), Some("tail".to_string()));
    }
}
