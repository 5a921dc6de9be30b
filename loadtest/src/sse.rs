//! Server-sent events: bytes in (split anywhere: across lines, inside UTF-8 characters), the
//! `data` of each complete event out.
//!
//! Only what OpenAI-style streams use is interpreted: `data:` lines (joined with `\n` when an
//! event has several), comment lines (`:` keep-alives, ignored) and the blank line that ends an
//! event. Other fields (`event:`, `id:`, `retry:`) are ignored. Lines end in `\n` or `\r\n`.

/// An event larger than this is treated as a broken stream rather than buffered forever.
pub const MAX_EVENT: usize = 16 << 20;

/// Incremental SSE parser.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The data of the current event so far.
    data: String,
    /// Whether the current event has a `data` field (an event of only comments is no event).
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds `bytes`; appends the data of every event they complete to `out`. Fails on an
    /// event over [`MAX_EVENT`] bytes or a line that is not UTF-8.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) -> Result<(), String> {
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.line_done(&line, out)?;
        }
        self.line.extend_from_slice(rest);
        if self.line.len() + self.data.len() > MAX_EVENT {
            return Err(format!("an SSE event longer than {MAX_EVENT} bytes"));
        }
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<String>) -> Result<(), String> {
        if line.is_empty() {
            if self.has_data {
                out.push(std::mem::take(&mut self.data));
                self.has_data = false;
            }
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|_| "an SSE line that is not UTF-8")?;
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field == "data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(value);
            self.has_data = true;
            if self.data.len() > MAX_EVENT {
                return Err(format!("an SSE event longer than {MAX_EVENT} bytes"));
            }
        }
        Ok(())
    }
}
