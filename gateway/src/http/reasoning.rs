//! Qwen's reasoning mode: text inside `<think>…</think>` becomes `reasoning_content`, the rest
//! `content`, incrementally, so stream deltas and full responses split the same way.
//!
//! Two starts are handled. Qwen3 emits `<think>` itself (the output may begin with it, after
//! optional whitespace); Qwen3.5 templates open `<think>\n` in the prompt, so the output begins
//! inside the reasoning and only `</think>` appears ([`ReasoningParser::new`] is told which,
//! from the prompt: [`prompt_opens_reasoning`]). The newlines the template puts around the
//! reasoning (`<think>\n…\n</think>\n\n`) are formatting, not text: they are dropped from both
//! parts, as Qwen's own template strips them when it renders a reply back into a prompt.

pub(crate) const THINK_START: &str = "<think>";
pub(crate) const THINK_END: &str = "</think>";

/// Whether a prompt leaves the reply inside an open `<think>` block: the last turn (from the
/// last `<|im_start|>`) opens one it does not close.
pub(crate) fn prompt_opens_reasoning(prompt: &str) -> bool {
    let turn = prompt
        .rfind("<|im_start|>")
        .map_or(prompt, |at| &prompt[at..]);
    match (turn.rfind(THINK_START), turn.rfind(THINK_END)) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        _ => false,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Nothing but whitespace seen: the output may still open `<think>`.
    AwaitStart,
    /// Inside the reasoning; `fresh` until its first character (leading newlines dropped).
    Reasoning { fresh: bool },
    /// Past the reasoning (or there was none); `fresh` right after `</think>`.
    Content { fresh: bool },
}

/// Text split into its reasoning and content parts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Split {
    pub reasoning: String,
    pub content: String,
}

/// Incremental `<think>` splitter.
#[derive(Clone, Debug)]
pub(crate) struct ReasoningParser {
    mode: Mode,
    /// Text not yet assigned: a possible partial tag, or newlines that may precede `</think>`.
    held: String,
}

impl ReasoningParser {
    /// `in_reasoning`: the prompt already opened `<think>`.
    pub(crate) fn new(in_reasoning: bool) -> Self {
        ReasoningParser {
            mode: if in_reasoning {
                Mode::Reasoning { fresh: true }
            } else {
                Mode::AwaitStart
            },
            held: String::new(),
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match self.mode {
                Mode::AwaitStart => {
                    let rest = self.held.trim_start();
                    if rest.is_empty() {
                        return out;
                    }
                    if let Some(after) = rest.strip_prefix(THINK_START) {
                        self.held = after.to_string();
                        self.mode = Mode::Reasoning { fresh: true };
                    } else if THINK_START.starts_with(rest) {
                        return out;
                    } else {
                        // No reasoning: everything, leading whitespace included, is content.
                        self.mode = Mode::Content { fresh: false };
                    }
                }
                Mode::Reasoning { fresh } => {
                    if fresh {
                        let rest = self.held.trim_start_matches('\n');
                        if rest.is_empty() {
                            self.held.clear();
                            return out;
                        }
                        self.held = rest.to_string();
                        self.mode = Mode::Reasoning { fresh: false };
                    }
                    if let Some(at) = self.held.find(THINK_END) {
                        out.reasoning
                            .push_str(self.held[..at].trim_end_matches('\n'));
                        self.held.drain(..at + THINK_END.len());
                        self.mode = Mode::Content { fresh: true };
                        continue;
                    }
                    // Hold a possible partial `</think>` and the newlines before it.
                    let keep = partial_tag_suffix(&self.held, THINK_END);
                    let release = self.held[..self.held.len() - keep]
                        .trim_end_matches('\n')
                        .len();
                    out.reasoning.push_str(&self.held[..release]);
                    self.held.drain(..release);
                    return out;
                }
                Mode::Content { fresh } => {
                    if fresh {
                        let rest = self.held.trim_start_matches('\n');
                        if rest.is_empty() {
                            self.held.clear();
                            return out;
                        }
                        self.held = rest.to_string();
                        self.mode = Mode::Content { fresh: false };
                    }
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// The output ended: held text goes where it stands (a reasoning cut off by the length
    /// limit keeps its trailing text as is).
    pub(crate) fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.mode {
            Mode::Reasoning { .. } => Split {
                reasoning: held,
                content: String::new(),
            },
            Mode::AwaitStart | Mode::Content { .. } => Split {
                reasoning: String::new(),
                content: held,
            },
        }
    }
}

/// Bytes at the end of `text` that are a proper prefix of `tag` (it may complete later).
pub(crate) fn partial_tag_suffix(text: &str, tag: &str) -> usize {
    let max = (tag.len() - 1).min(text.len());
    (1..=max)
        .rev()
        .find(|&len| {
            let start = text.len() - len;
            text.is_char_boundary(start) && tag.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` and returns the concatenated parts, plus the parts piece by piece.
    fn run(in_reasoning: bool, pieces: &[&str]) -> (Split, Vec<Split>) {
        let mut p = ReasoningParser::new(in_reasoning);
        let mut steps: Vec<Split> = pieces.iter().map(|t| p.push(t)).collect();
        steps.push(p.finish());
        let mut all = Split::default();
        for s in &steps {
            all.reasoning.push_str(&s.reasoning);
            all.content.push_str(&s.content);
        }
        (all, steps)
    }

    #[test]
    fn output_that_opens_think_itself() {
        let (all, _) = run(
            false,
            &["<think>\nLet me see.\n</think>\n\nThe answer is 4."],
        );
        assert_eq!(all.reasoning, "Let me see.");
        assert_eq!(all.content, "The answer is 4.");
    }

    #[test]
    fn tags_split_across_pieces() {
        let pieces = [
            "<th", "ink>", "\n", "step 1\n", "\nstep 2", "\n</", "thi", "nk>", "\n", "\nDone", ".",
        ];
        let (all, steps) = run(false, &pieces);
        assert_eq!(all.reasoning, "step 1\n\nstep 2");
        assert_eq!(all.content, "Done.");
        // No partial tag ever leaks out.
        for s in steps {
            assert!(
                !s.reasoning.contains('<') && !s.content.contains('<'),
                "{s:?}"
            );
        }
    }

    #[test]
    fn prompt_opened_reasoning() {
        let (all, _) = run(true, &["I think", " so.\n", "</think>\n\n", "Yes."]);
        assert_eq!(all.reasoning, "I think so.");
        assert_eq!(all.content, "Yes.");
        // Cut off by the length limit: all of it is reasoning.
        let (all, _) = run(true, &["still thinking", " </thi"]);
        assert_eq!(all.reasoning, "still thinking </thi");
        assert_eq!(all.content, "");
    }

    #[test]
    fn output_without_reasoning_is_content() {
        let (all, _) = run(false, &["  Hello", " <think> is a tag"]);
        assert_eq!(all.reasoning, "");
        assert_eq!(all.content, "  Hello <think> is a tag");
        let (all, _) = run(false, &["<thinking"]);
        assert_eq!(all.content, "<thinking");
    }

    #[test]
    fn detects_an_open_think_in_the_prompt() {
        assert!(prompt_opens_reasoning(
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
        ));
        assert!(!prompt_opens_reasoning(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!prompt_opens_reasoning(
            "<|im_start|>user\n<think><|im_end|>\n<|im_start|>assistant\n"
        ));
    }
}
